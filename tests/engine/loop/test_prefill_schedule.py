"""Which prompt gets the next prefill slice, with fake workers (no model): priority, then the least remaining
work, ageing so nothing starves, planned chunks applied by request, and one failure contained to its request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from mlx_server.engine.loop.prefill import PrefillChunk, Prefiller


@dataclass
class FakeWork:
    request_id: int
    model: str
    priority: int
    enqueued: float
    tokens: int
    done: int = 0
    cached: int = 0
    started: Optional[float] = None
    logged: float = 0.0
    chunks: int = 0
    last_chunk: int = 0

    @property
    def size(self) -> int:
        return self.tokens

    @property
    def remaining(self) -> int:
        return self.tokens - self.done


@dataclass
class FakeWorker:
    name: str
    jobs: list[FakeWork] = field(default_factory=list)
    ran: list[tuple[int, int]] = field(default_factory=list)
    broken: set[int] = field(default_factory=set)
    failed: list[int] = field(default_factory=list)

    def prefill_jobs(self) -> list[FakeWork]:
        return [j for j in self.jobs if j.remaining > 0]

    def prefill(self, job: FakeWork, n: int) -> int:
        if job.request_id in self.broken:
            raise RuntimeError("bad chunk")
        job.done += n
        self.ran.append((job.request_id, n))
        return n

    def fail_prefill(self, job: FakeWork, exc: Exception) -> None:
        self.failed.append(job.request_id)
        self.jobs.remove(job)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_whole_prompts_shortest_first_within_a_priority() -> None:
    w = FakeWorker("m", [FakeWork(1, "m", 1, 0.0, 500), FakeWork(2, "m", 1, 0.0, 20), FakeWork(3, "m", 0, 0.0, 900)])
    prefiller = Prefiller(0.0, max_chunk=10_000, clock=Clock())
    order = []
    while w.prefill_jobs():
        before = len(w.ran)
        prefiller.run([w])
        order += [rid for rid, _ in w.ran[before:]]
    assert order == [3, 2, 1]  # HIGH (0) first whatever its length, then the shorter of the two MEDIUM


def test_a_long_prompt_that_waited_overtakes_newcomers() -> None:
    clock = Clock()
    prefiller = Prefiller(0.0, max_chunk=10_000, aging=30.0, clock=clock)
    old = FakeWork(1, "m", 1, clock.now - 10, 4000)  # 10 s at the assumed 500 tok/s: credited 5,000 tokens
    new = FakeWork(2, "m", 1, clock.now, 200)
    w = FakeWorker("m", [new, old])
    prefiller.run([w])
    assert w.ran[0][0] == 1


def test_planned_chunks_are_applied_by_request_and_skip_the_ones_that_left() -> None:
    a, b = FakeWorker("a", [FakeWork(1, "a", 1, 0.0, 100)]), FakeWorker("b", [FakeWork(2, "b", 1, 0.0, 100)])
    done = Prefiller(0.05).apply([a, b], (PrefillChunk("b", 2, 30), PrefillChunk("a", 9, 30),
                                          PrefillChunk("a", 1, 500)))
    assert b.ran == [(2, 30)] and a.ran == [(1, 100)]  # a chunk never runs past its prompt
    assert done.chunks == 2 and done.tokens == 130


def test_the_plan_picks_the_best_ranked_chunk() -> None:
    w = FakeWorker("m", [FakeWork(1, "m", 2, 0.0, 100), FakeWork(2, "m", 1, 0.0, 100)])
    [chunk] = Prefiller(0.05, clock=Clock()).plan([w])
    assert chunk.request_id == 2 and chunk.model == "m" and 0 < chunk.tokens <= 100


def test_one_failed_chunk_fails_its_request_only_unless_the_group_must_agree() -> None:
    w = FakeWorker("m", [FakeWork(1, "m", 1, 0.0, 50), FakeWork(2, "m", 1, 0.0, 60)], broken={1})
    Prefiller(0.0, clock=Clock()).run([w])
    Prefiller(0.0, clock=Clock()).run([w])
    assert w.failed == [1] and w.ran == [(2, 60)]
    group = FakeWorker("m", [FakeWork(3, "m", 1, 0.0, 50)], broken={3})
    with pytest.raises(RuntimeError):
        Prefiller(0.0, clock=Clock(), contained=False).run([group])
