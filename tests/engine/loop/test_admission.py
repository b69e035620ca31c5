"""Wait-list order: priority, then arrival; ageing lifts a long-waiting request one level per period."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_server.contract.requests import GenerateRequest, Priority
from mlx_server.engine.loop.admission import Waiting, WaitList
from mlx_server.engine.loop.jobs import Outcome


@dataclass(frozen=True)
class FakeJob:
    """The wait list orders jobs by their request alone: any kind will do."""

    request: GenerateRequest

    def admit(self, loop: Any, load_seconds: float) -> Outcome:
        return "started"

    def wire(self) -> FakeJob:
        return self

    def for_rank(self, preparer: Any) -> FakeJob:
        return self


def waiting(priority: Priority, at: float) -> Waiting:
    return Waiting(FakeJob(GenerateRequest(model="m", prompt="x", priority=priority)), lambda e: None, at)


def test_priority_then_arrival() -> None:
    wl = WaitList(aging=30)
    items = [waiting(Priority.LOW, 0), waiting(Priority.MEDIUM, 1), waiting(Priority.HIGH, 2),
             waiting(Priority.MEDIUM, 3)]
    for w in items:
        wl.push(w)
    assert [wl.pop(now=5) for _ in items] == [items[2], items[1], items[3], items[0]]


def test_ageing_keeps_low_from_starving() -> None:
    wl = WaitList(aging=30)
    old_low = waiting(Priority.LOW, 0)
    wl.push(old_low)
    fresh_high = waiting(Priority.HIGH, 65)
    wl.push(fresh_high)
    # after 65 s the LOW request has gained two levels: as good as HIGH, and it came first
    assert wl.pop(now=65) is old_low
    assert wl.pop(now=65) is fresh_high
    wl.push(waiting(Priority.LOW, 0))
    newer = waiting(Priority.HIGH, 20)
    wl.push(newer)
    assert wl.pop(now=25) is newer  # 25 s of waiting is not yet a level
