"""The wait list: requests not yet decoding, in priority order, and those parked behind a model load.

Owned by the inference thread. Priority first (HIGH before MEDIUM before LOW), then arrival order — except that
a request gains one priority level for every `aging` seconds it has waited, so under saturation a LOW request
is delayed, never starved.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

from mlx_server.contract.events import Sink
from mlx_server.contract.requests import EngineRequest
from mlx_server.engine.loop.jobs import Job


@dataclass
class Waiting:
    job: Job
    sink: Sink
    enqueued: float
    load_seconds: float = 0.0  # the load this request waited for, reported as its load_duration

    @property
    def request(self) -> EngineRequest:
        return self.job.request


class WaitList:
    def __init__(self, aging: float = 30.0) -> None:
        self.aging = aging
        self._heap: list[tuple[int, int, Waiting]] = []
        self._order = itertools.count()
        self._parked: dict[str, list[Waiting]] = {}  # model → requests waiting for it to finish loading

    def __len__(self) -> int:
        return len(self._heap) + sum(len(p) for p in self._parked.values())

    def ready(self) -> bool:
        return bool(self._heap)

    def push(self, w: Waiting) -> None:
        heapq.heappush(self._heap, (int(w.request.priority), next(self._order), w))

    def peek(self, now: float) -> Waiting:
        """The next request to admit: best priority after ageing, then the earliest to arrive."""
        if self.aging > 0 and len(self._heap) > 1:

            def rank(item: tuple[int, int, Waiting]) -> tuple[float, int]:
                priority, order, w = item
                return priority - (now - w.enqueued) // self.aging, order

            return min(self._heap, key=rank)[2]
        return self._heap[0][2]

    def pop(self, now: float) -> Waiting:
        best = self.peek(now)
        self.discard(best)
        return best

    def discard(self, w: Waiting) -> None:
        """Take `w` off the ready heap (it starts, or fails)."""
        self._heap = [item for item in self._heap if item[2] is not w]
        heapq.heapify(self._heap)

    @property
    def parked(self) -> int:
        return sum(len(p) for p in self._parked.values())

    def park(self, model: str, w: Waiting) -> None:
        self._parked.setdefault(model, []).append(w)

    def unpark(self, model: str) -> list[Waiting]:
        return self._parked.pop(model, [])

    def requeue_parked(self) -> None:
        """Requests that waited behind another model's load get their turn to start theirs."""
        for parked in self._parked.values():
            for w in parked:
                self.push(w)
        self._parked.clear()

    def __iter__(self) -> Iterator[Waiting]:
        yield from (w for _, _, w in self._heap)
        yield from (w for parked in self._parked.values() for w in parked)

    def remove(self, request_id: int) -> Optional[Waiting]:
        found = next((w for w in self if w.request.request_id == request_id), None)
        if found is not None:
            self._heap = [item for item in self._heap if item[2] is not found]
            heapq.heapify(self._heap)
            for parked in self._parked.values():
                if found in parked:
                    parked.remove(found)
        return found

    def expired(self, now: float) -> list[Waiting]:
        """Remove and return the requests whose timeout passed while they waited."""
        late = [w for w in self if w.request.timeout is not None and now >= w.request.created + w.request.timeout]
        for w in late:
            self.remove(w.request.request_id)
        return late
