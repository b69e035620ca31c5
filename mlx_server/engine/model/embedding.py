"""Embedding on one loaded model (its `embed` worker): packed, length-bucketed forward passes, scheduled like
prompt prefill.

An embed request becomes one piece of work whose "prompt" is all of its inputs. The prefill scheduler
(engine/loop/prefill.py) gives it slices between decode steps like any prompt, so a 1,000-document embed never
stalls a running stream by more than a slice. Each slice packs inputs of similar length — this request's first,
then other waiting requests' for the same model — into padded batches with an attention mask.

Embedding models embed with their own encoder; generation models embed too (Ollama's behaviour), mean-pooling
the final hidden states (`decoder_forward`).

The packing, slicing, memory and cancellation rules are `PackedBatcher`'s, which reranking
(engine/model/reranking.py) shares: a rerank request is the same kind of work, one input per (query, document) pair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Optional, Protocol, TypeVar

import mlx.core as mx
import numpy as np

from mlx_server.contract.errors import BadRequest, InternalError, MlxServerError, RequestTimeout
from mlx_server.contract.events import Done, Embeddings, Event, Failed, Sink, Started, Usage
from mlx_server.contract.requests import Priority
from mlx_server.engine.loop.budget import EMBED_BATCH_TOKENS, activation_bound
from mlx_server.engine.loop.jobs import ModelJob
from mlx_server.engine.model.embedders import pool
from mlx_server.engine.prepare.stage import PreparedEmbed

Forward = Callable[[list[list[int]]], mx.array]  # padded batch of token ids → (batch, width) pooled, unnormalized
MAX_BATCH = 64  # inputs per forward pass


class Batched(Protocol):
    """What the batcher reads of a request it serves (EmbedRequest, RerankRequest)."""

    @property
    def request_id(self) -> int: ...

    @property
    def model(self) -> str: ...

    @property
    def priority(self) -> Priority: ...

    @property
    def timeout(self) -> Optional[float]: ...

    @property
    def created(self) -> float: ...


@dataclass
class EmbedWork:
    """One request's inputs and the rows made so far; shaped like a PrefillJob for the scheduler."""

    request: Batched
    sink: Sink
    inputs: list[list[int]]
    dimensions: Optional[int]
    admitted: float
    load_duration: float
    order: list[int]  # input indices, shortest first, still to embed
    vectors: list[Optional[np.ndarray]] = field(default_factory=list)
    normalize: bool = True
    done: int = 0
    cached: int = 0
    started: Optional[float] = None
    logged: float = 0.0
    chunks: int = 0
    last_chunk: int = 0
    # A pass holds whole inputs anyway: asking for fewer tokens than one input makes it one input, not two.
    min_chunk: ClassVar[int] = 1

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def priority(self) -> int:
        return int(self.request.priority)

    @property
    def enqueued(self) -> float:
        return self.admitted

    @property
    def size(self) -> int:
        return sum(len(ids) for ids in self.inputs)

    @property
    def remaining(self) -> int:
        return self.size - self.done


W = TypeVar("W", bound=EmbedWork)


def shortest_first(inputs: list[list[int]]) -> list[int]:
    return sorted(range(len(inputs)), key=lambda i: len(inputs[i]))


class PackedBatcher(Generic[W]):
    """The requests of one kind on one model, and the packed forward passes that serve them: implements
    engine.loop.jobs.Worker but for `add`, the pass itself (`forward_rows`) and the result (`result`)."""

    what: ClassVar[str] = "embedding"  # what a failed pass says failed

    def __init__(self, name: str, width: int, per_token: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.width = width  # of one row of results
        self.per_token = per_token  # bytes of activations per token in a forward pass
        self.clock = clock
        self.jobs: dict[int, W] = {}

    def start(self, job: W) -> None:
        """Take in a job made by the subclass's `add`: it is announced, and answered at once if it has no input."""
        self.jobs[job.request_id] = job
        job.sink(Started(job.request_id, self.name, job.size, 0, job.load_duration))
        if not job.inputs:
            self._finish(job)

    def forward_rows(self, picked: list[tuple[W, int]]) -> np.ndarray:
        """One padded pass over these inputs (job, index): float32 (len(picked), width)."""
        raise NotImplementedError

    def result(self, job: W) -> Event:
        """The event carrying a finished job's rows (its Done follows)."""
        raise NotImplementedError

    def pending(self) -> list[W]:
        return [j for j in self.jobs.values() if j.order]

    def _reservation(self, extra: int = 0) -> int:
        """Activation memory of the largest forward pass the jobs (and a job of `extra` tokens) can make."""
        longest = max((len(x) for j in self.jobs.values() for x in j.inputs), default=0)
        total = sum(j.remaining for j in self.jobs.values()) + extra
        return activation_bound(total, max(longest, extra), self.per_token)

    # ---- engine.loop.jobs.Worker ----------------------------------------------------------------------------

    @property
    def reserved(self) -> int:
        return self._reservation()

    def needed(self, prepared: ModelJob) -> int:
        return self._reservation(prepared.kv_tokens) - self._reservation()

    def footprint(self, prepared: ModelJob) -> int:
        return self.per_token * prepared.kv_tokens

    @property
    def stored(self) -> int:
        return 0  # nothing is kept between requests

    def trim(self, limit: int) -> None:
        return None

    joining = False  # no decode batch: never owes a first token

    def has_work(self) -> bool:
        return bool(self.jobs)

    def step(self, now: Optional[float] = None) -> int:
        self.expire(time.monotonic() if now is None else now)
        return 0

    def prefill_jobs(self) -> list[W]:
        return self.pending()

    def prefill(self, job: W, n: int) -> int:
        return self.run(job, n)

    def fail_prefill(self, job: W, exc: Exception) -> None:
        self.end(job.request_id, Failed(job.request_id, InternalError(f"{self.what} failed for this request: {exc}")))

    def cancel(self, request_id: int) -> bool:
        return self.end(request_id, None)

    def close(self) -> None:
        self.fail_all(MlxServerError(f'model "{self.name}" was unloaded'))
        self.release()

    def release(self) -> None:
        """Drop the model the passes close over, so gc frees it."""

    def run(self, job: W, n: int) -> int:
        """Run about `n` tokens' worth of inputs: `job`'s next ones, then other jobs' of similar length."""
        n = min(n, EMBED_BATCH_TOKENS)
        picked: list[tuple[W, int]] = []
        tokens = longest = 0
        for candidate in [job, *(j for j in self.pending() if j is not job)]:
            while candidate.order and len(picked) < MAX_BATCH:
                index = candidate.order[0]
                length = len(candidate.inputs[index])
                # The batch pads to its longest row: stop where adding this one would cost more than `n` tokens.
                if picked and max(longest, length) * (len(picked) + 1) > max(n, tokens):
                    break
                candidate.order.pop(0)
                picked.append((candidate, index))
                tokens += length
                longest = max(longest, length)
            if tokens >= n or len(picked) >= MAX_BATCH:
                break
        vectors = self.forward_rows(picked)
        for row, (owner, index) in enumerate(picked):
            owner.vectors[index] = vectors[row]
            owner.done += len(owner.inputs[index])
        for owner in {id(o): o for o, _ in picked}.values():
            owner.chunks += 1
            if not owner.order:
                self._finish(owner)
        return tokens

    def rows(self, job: W) -> np.ndarray:
        """A finished job's rows in input order: (inputs, width)."""
        if not job.inputs:
            return np.zeros((0, self.width), np.float32)
        return np.stack([v for v in job.vectors if v is not None])

    def _finish(self, job: W) -> None:
        self.jobs.pop(job.request_id, None)
        now = self.clock()
        job.sink(self.result(job))
        job.sink(
            Done(
                job.request_id,
                self.name,
                "stop",
                Usage(
                    prompt_tokens=job.size,
                    load_duration=job.load_duration,
                    prompt_eval_duration=now - job.admitted,
                    total_duration=max(now - job.request.created, job.load_duration + now - job.admitted),
                ),
            )
        )

    def end(self, request_id: int, event: Optional[Event]) -> bool:
        """Drop a job, telling it `event` (None: tell it it was cancelled)."""
        job = self.jobs.pop(request_id, None)
        if job is None:
            return False
        job.sink(event or Done(request_id, self.name, "cancelled", Usage(prompt_tokens=job.size)))
        return True

    def expire(self, now: float) -> None:
        for job in list(self.jobs.values()):
            t = job.request.timeout
            if t is not None and now >= job.request.created + t:
                self.end(job.request_id, Failed(job.request_id, RequestTimeout(f"request timed out after {t:g}s")))

    def fail_all(self, error: MlxServerError) -> None:
        for request_id in list(self.jobs):
            self.end(request_id, Failed(request_id, error))


class EmbedBatcher(PackedBatcher[EmbedWork]):
    """The embed requests of one model. Implements engine.loop.jobs.Worker for `PreparedEmbed` requests."""

    def __init__(
        self, name: str, forward: Forward, width: int, per_token: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(name, width, per_token, clock)
        self.forward: Optional[Forward] = forward

    def add(self, prepared: PreparedEmbed, sink: Sink, load_duration: float = 0.0) -> None:
        req = prepared.request
        if prepared.dimensions is not None and prepared.dimensions > self.width:
            raise BadRequest(f"dimensions {prepared.dimensions} is larger than the model's {self.width}")
        self.start(
            EmbedWork(
                req,
                sink,
                prepared.inputs,
                prepared.dimensions,
                self.clock(),
                load_duration,
                shortest_first(prepared.inputs),
                vectors=[None] * len(prepared.inputs),
                normalize=req.normalize,
            )
        )

    def forward_rows(self, picked: list[tuple[EmbedWork, int]]) -> np.ndarray:
        assert self.forward is not None, "closed"
        return np.array(self.forward([j.inputs[i] for j, i in picked]), dtype=np.float32)

    def release(self) -> None:
        self.forward = None

    def result(self, job: EmbedWork) -> Event:
        rows = self.rows(job)
        if job.dimensions is not None:
            rows = rows[:, : job.dimensions]  # Matryoshka: cut, then normalize again
        if job.normalize:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return Embeddings(job.request_id, self.name, rows.astype(np.float32), job.size)


def decoder_forward(model: Any) -> Optional[Forward]:
    """Mean-pooled final hidden states of an mlx_lm model (its `.model`, the stack without the LM head), or None.

    Right padding needs no mask here: attention is causal, so real tokens never see the pads after them."""
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None

    def forward(batch: list[list[int]]) -> mx.array:
        width = max(len(row) for row in batch)
        ids = mx.array([row + [0] * (width - len(row)) for row in batch], dtype=mx.int32)
        mask = mx.arange(width)[None, :] < mx.array([len(row) for row in batch])[:, None]
        vectors = pool(body(ids), mask, "mean")
        mx.eval(vectors)
        return vectors

    return forward


__all__ = ["Batched", "EmbedBatcher", "EmbedWork", "MAX_BATCH", "PackedBatcher", "decoder_forward", "shortest_first"]
