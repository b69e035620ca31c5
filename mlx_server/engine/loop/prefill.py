"""Chunked, time-sliced prompt prefill, and which prompt gets the next slice.

mlx_lm's BatchGenerator prefills a new prompt inside one `next()` call, so every running stream freezes until a
long prompt is done. Here each admitted prompt owns its KV cache and is prefilled a chunk at a time between decode
steps, in chunks sized to a time slice from the model's measured prefill rate; when only its last token is left
it joins the batch through `BatchGenerator.insert` with that cache (as a prefix-cache hit already does).

Which prompt goes next: priority first (ageing one level per `aging` seconds, as the wait list does), then the
least remaining work, shortest-remaining-first so a short request arriving behind a long prompt gets its first
token after about one slice. A prompt's remaining work is credited with the tokens the model could have prefilled
while it waited, so a long prompt overtakes newcomers after at most about its own prefill time: never starved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import mlx.core as mx

from mlx_server.engine.loop.jobs import Work

log = logging.getLogger("mlx_server.engine")

MIN_CHUNK = 16  # below this the per-call overhead dominates; a slice always makes at least this much progress
FIRST_RATE = 500.0  # tokens/s assumed before a model's first chunk is measured (sizes its first chunk ~25 tokens)
PROGRESS_LOG_SECONDS = 2.0  # long prefills log their progress this often


@dataclass(frozen=True)
class PrefillChunk:
    """A planned chunk: `tokens` more of request `request_id`'s prompt on `model` (distributed step plans)."""

    model: str
    request_id: int
    tokens: int


@dataclass
class EncodeGate:
    """Whether an image may be encoded in this prefill slice (one per slice: its worker reopens it each step)."""

    open: bool = True


@dataclass
class PrefillJob:
    """One prompt being prefilled: `cache` holds the KV of `tokens[:done]` (a cached prefix counts as done)."""

    request_id: int
    model: str
    priority: int
    tokens: list[int]
    cache: list[Any]
    done: int
    enqueued: float  # monotonic, when it was admitted
    cached: int = 0  # tokens that came from the prompt cache
    started: Optional[float] = None  # perf_counter of its first chunk
    logged: float = 0.0  # perf_counter of its last progress line
    chunks: int = 0
    last_chunk: int = 0  # tokens in its previous chunk: chunks at most double (see Prefiller.chunk_size)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def target(self) -> int:
        """Tokens to prefill before joining the batch: all but the last, which the first decode step feeds."""
        return len(self.tokens) - 1

    @property
    def remaining(self) -> int:
        return max(0, self.target - self.done)

    def ready(self, gate: EncodeGate) -> bool:
        """It has prefill it can run now (a vision prompt may wait on its next image's encode)."""
        return self.remaining > 0

    def advance(self, model: Any, n: int, gate: Optional[EncodeGate] = None) -> int:
        """Run the next `n` prompt tokens through the model into this job's cache; returns how many ran."""
        chunk = mx.array(self.tokens[self.done : self.done + n])[None]
        model(chunk, cache=self.cache)  # the logits stay lazy and are never evaluated: only the KV is needed
        mx.eval([c.state for c in self.cache])
        self.done += n
        self.chunks += 1
        return n


class Prefilling(Protocol):
    """What the scheduler needs of a worker (jobs.Worker has it all)."""

    name: str

    def prefill_jobs(self) -> Sequence[Work]: ...

    def prefill(self, job: Any, n: int) -> int:
        """Run about `n` tokens of `job`; returns how many ran (an embed batch packs whole inputs)."""
        ...

    def fail_prefill(self, job: Any, exc: Exception) -> None: ...


@dataclass
class Rate:
    """A model's prefill speed in tokens/s, smoothed: attention makes it fall as prompts grow."""

    tokens_per_second: float = FIRST_RATE
    measured: bool = False

    def record(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        sample = tokens / seconds
        self.tokens_per_second = sample if not self.measured else 0.5 * self.tokens_per_second + 0.5 * sample
        self.measured = True


@dataclass
class PrefillResult:
    tokens: int = 0
    chunks: int = 0


@dataclass
class Prefiller:
    """Spends at most one slice per engine iteration on prompt prefill (slice 0: whole prompts, as mlx_lm)."""

    slice_seconds: float
    max_chunk: int = 2048
    aging: float = 30.0
    clock: Callable[[], float] = time.monotonic
    rates: dict[str, Rate] = field(default_factory=dict)
    contained: bool = True  # a failed chunk fails its request only; distributed, it breaks the group (as a step)

    def rank(self, job: Work, now: float) -> tuple[float, float, float]:
        waited = max(0.0, now - job.enqueued)
        levels = waited // self.aging if self.aging > 0 else 0
        credit = waited * self.rate(job.model).tokens_per_second
        return job.priority - levels, job.remaining - credit, job.enqueued

    def rate(self, model: str) -> Rate:
        return self.rates.setdefault(model, Rate())

    def chunk_size(self, job: Work, seconds_left: float) -> int:
        if self.slice_seconds <= 0:
            return min(self.max_chunk, job.remaining)
        # Half a slice at most: a request arriving mid-slice waits for one chunk, not a whole slice.
        n = int(self.rate(job.model).tokens_per_second * min(seconds_left, self.slice_seconds / 2))
        # A rate measured on other prompts (short ones, early positions) overestimates a long prompt's: attention
        # grows with the position. So a prompt's chunks start small and at most double, each measured.
        floor = getattr(job, "min_chunk", MIN_CHUNK)
        n = min(n, 2 * max(floor, job.last_chunk))
        return min(job.remaining, self.max_chunk, max(floor, n))

    def plan(self, runners: Sequence[Prefilling]) -> tuple[PrefillChunk, ...]:
        """Distributed: the next chunk, decided on rank 0 alone (rates and time differ per rank) and sent in the
        step plan. One chunk per iteration, sized to the whole slice: each iteration already waits on the ranks."""
        jobs = [(r, j) for r in runners for j in r.prefill_jobs()]
        if not jobs:
            return ()
        now = self.clock()
        runner, job = min(jobs, key=lambda rj: self.rank(rj[1], now))
        n = (
            self.chunk_size(job, self.slice_seconds * 2)
            if self.slice_seconds > 0
            else min(self.max_chunk, job.remaining)
        )
        return (PrefillChunk(runner.name, job.request_id, n),)

    def apply(self, runners: Sequence[Prefilling], chunks: tuple[PrefillChunk, ...]) -> PrefillResult:
        """Run planned chunks; one whose prompt has left meanwhile (cancelled, timed out) is skipped on every rank."""
        result = PrefillResult()
        for chunk in chunks:
            found = next(
                (
                    (r, j)
                    for r in runners
                    if r.name == chunk.model
                    for j in r.prefill_jobs()
                    if j.request_id == chunk.request_id
                ),
                None,
            )
            if found is None:
                continue
            runner, job = found
            self._one(runner, job, min(chunk.tokens, job.remaining), result)
        return result

    def _one(self, runner: Prefilling, job: Work, n: int, result: PrefillResult) -> bool:
        tic = time.perf_counter()
        job.started = job.started or tic
        try:
            n = runner.prefill(job, n)
        except Exception as exc:  # noqa: BLE001 - one prompt's failure fails it, never the batch or thread
            if not self.contained:
                raise
            log.exception("prefill of request %d failed", job.request_id)
            runner.fail_prefill(job, exc)
            return False
        self.rate(job.model).record(n, time.perf_counter() - tic)
        job.last_chunk = n
        result.tokens += n
        result.chunks += 1
        _log_progress(job)
        return True

    def run(self, runners: Sequence[Prefilling], interrupted: Callable[[], bool] = lambda: False) -> PrefillResult:
        """Prefill the best-ranked prompts until the slice is spent (at least one chunk, so work always moves).

        The slice ends early when a prompt is done (its first token is one decode step away) or `interrupted()`
        says new requests wait to be admitted (a short one should not sit behind the rest of the slice)."""
        result = PrefillResult()
        start = time.perf_counter()
        deadline = start + self.slice_seconds
        whole: Optional[Work] = None  # slice 0: the one prompt being finished this iteration
        while True:
            jobs = [(r, j) for r in runners for j in r.prefill_jobs()]
            if not jobs:
                return result
            left = deadline - time.perf_counter()
            if self.slice_seconds > 0 and result.chunks and left < 0.25 * self.slice_seconds:
                return result  # a chunk would overrun the slice by more than it is worth
            now = self.clock()
            if whole is not None:
                jobs = [(r, j) for r, j in jobs if j is whole]
                if not jobs:
                    return result
            runner, job = min(jobs, key=lambda rj: self.rank(rj[1], now))
            if self.slice_seconds <= 0:
                whole = job
            if not self._one(runner, job, self.chunk_size(job, left), result):
                continue
            if self.slice_seconds > 0 and (job.remaining == 0 or interrupted()):
                return result


def _log_progress(job: Work) -> None:
    now = time.perf_counter()
    if job.remaining == 0:
        took = now - (job.started or now)
        if took >= PROGRESS_LOG_SECONDS:
            log.info(
                "request %d model=%s prefilled %d tokens in %.1fs (%d chunks, %.0f tok/s)",
                job.request_id,
                job.model,
                job.done - job.cached,
                took,
                job.chunks,
                (job.done - job.cached) / took,
            )
    elif now - max(job.logged, job.started or now) >= PROGRESS_LOG_SECONDS:
        job.logged = now
        log.info(
            "request %d model=%s prefill %d/%d tokens (%.0f%%)",
            job.request_id,
            job.model,
            job.done,
            job.size,
            100.0 * job.done / max(1, job.size),
        )


__all__ = ["MIN_CHUNK", "EncodeGate", "PrefillChunk", "PrefillJob", "PrefillResult", "Prefiller", "Prefilling", "Rate"]
