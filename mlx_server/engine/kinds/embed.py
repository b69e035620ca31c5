"""Embedding work on the inference thread: packed, length-bucketed forward passes, scheduled like prompt prefill.

An embed request becomes one job whose "prompt" is all of its inputs. The prefill scheduler (engine/prefill.py)
gives it slices between decode steps like any prompt, so a 1,000-document embed never stalls a running stream by
more than a slice. Each slice packs inputs of similar length — this request's first, then other waiting requests'
for the same model — into padded batches with an attention mask.

Embedding models run in an `EmbedRunner`; generation models embed too (Ollama's behaviour) through their
runner's `EmbedBatcher`, mean-pooling the final hidden states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import mlx.core as mx
import numpy as np

from mlx_server.engine.model.embedders import Embedder, pool
from mlx_server.engine.prepare.stage import EMBED_BATCH_TOKENS, PreparedEmbed
from mlx_server.contract.errors import BadRequest, InternalError, MlxServerError, RequestTimeout
from mlx_server.contract.events import Done, Embeddings, Event, Failed, Started, Usage
from mlx_server.contract.requests import EmbedRequest

Sink = Callable[[Event], None]
Forward = Callable[[list[list[int]]], mx.array]  # padded batch of token ids → (batch, width) pooled, unnormalized
MAX_BATCH = 64  # inputs per forward pass
ACTIVATION_FACTOR = 8  # float32 hidden-width buffers alive per token in a forward pass (hidden, MLP, q/k/v)


@dataclass
class EmbedJob:
    """One EmbedRequest's inputs and the vectors made so far; shaped like a PrefillJob for the scheduler."""

    request: EmbedRequest
    sink: Sink
    inputs: list[list[int]]
    dimensions: Optional[int]
    admitted: float
    load_duration: float
    order: list[int]  # input indices, shortest first, still to embed
    vectors: list[Optional[np.ndarray]] = field(default_factory=list)
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


class EmbedBatcher:
    """The embed jobs of one model, and the packed forward passes that serve them."""

    def __init__(self, name: str, forward: Forward, width: int, per_token: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.forward = forward
        self.width = width
        self.per_token = per_token  # bytes of activations per token in a forward pass
        self.clock = clock
        self.jobs: dict[int, EmbedJob] = {}

    def add(self, prepared: PreparedEmbed, sink: Sink, load_duration: float = 0.0) -> None:
        req = prepared.request
        if prepared.dimensions is not None and prepared.dimensions > self.width:
            raise BadRequest(f"dimensions {prepared.dimensions} is larger than the model's {self.width}")
        order = sorted(range(len(prepared.inputs)), key=lambda i: len(prepared.inputs[i]))
        job = EmbedJob(req, sink, prepared.inputs, prepared.dimensions, self.clock(), load_duration, order,
                       vectors=[None] * len(prepared.inputs))
        self.jobs[req.request_id] = job
        sink(Started(req.request_id, self.name, job.size, 0, load_duration))
        if not job.inputs:
            self._finish(job)

    def pending(self) -> list[EmbedJob]:
        return [j for j in self.jobs.values() if j.order]

    def reserved(self, extra: int = 0) -> int:
        """Activation memory of the largest forward pass the jobs (and a job of `extra` tokens) can make."""
        longest = max((len(x) for j in self.jobs.values() for x in j.inputs), default=0)
        total = sum(j.remaining for j in self.jobs.values()) + extra
        return min(total, max(EMBED_BATCH_TOKENS, longest, extra)) * self.per_token

    def run(self, job: EmbedJob, n: int) -> int:
        """Embed about `n` tokens' worth of inputs: `job`'s next ones, then other jobs' of similar length."""
        n = min(n, EMBED_BATCH_TOKENS)
        picked: list[tuple[EmbedJob, int]] = []
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
        vectors = np.array(self.forward([j.inputs[i] for j, i in picked]), dtype=np.float32)
        for row, (owner, index) in enumerate(picked):
            owner.vectors[index] = vectors[row]
            owner.done += len(owner.inputs[index])
        for owner in {id(o): o for o, _ in picked}.values():
            owner.chunks += 1
            if not owner.order:
                self._finish(owner)
        return tokens

    def _finish(self, job: EmbedJob) -> None:
        self.jobs.pop(job.request_id, None)
        rows = np.stack([v for v in job.vectors if v is not None]) if job.inputs else np.zeros((0, self.width),
                                                                                                  np.float32)
        if job.dimensions is not None:
            rows = rows[:, :job.dimensions]  # Matryoshka: cut, then normalize again
        if job.request.normalize:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        rows = rows.astype(np.float32)
        now = self.clock()
        job.sink(Embeddings(job.request_id, self.name, rows, job.size))
        job.sink(Done(job.request_id, self.name, "stop", Usage(
            prompt_tokens=job.size, load_duration=job.load_duration, prompt_eval_duration=now - job.admitted,
            total_duration=max(now - job.request.created, job.load_duration + now - job.admitted))))

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


class EmbedRunner:
    """A resident embedding model: the same face to the core as a ModelRunner, with no decode batch."""

    def __init__(self, name: str, embedder: Embedder, *, per_token: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """per_token: activation bytes per token of a forward pass (the preparation stage's estimate, so that
        what is reserved before the load and after it agree); default from the width alone."""
        self.name = name
        self.embedder = embedder
        self.context_length = embedder.max_length
        self.joining = False  # no decode batch: never owes a first token
        self.shards = 1  # never split: distributed, every rank holds a whole copy
        self.split = ""
        width = embedder.dimensions
        self.batcher = EmbedBatcher(name, lambda batch: embedder.embed(batch, normalize=False), width,
                                    per_token or ACTIVATION_FACTOR * 4 * width, clock)

    # memory: no KV; a forward pass's activations are reserved while jobs wait
    def kv_bytes(self, lengths: list[int]) -> int:
        return self.batcher.per_token * min(sum(lengths), max(EMBED_BATCH_TOKENS, *lengths, 0))

    def footprint(self, prepared: PreparedEmbed) -> int:
        return self.batcher.per_token * prepared.kv_tokens

    @property
    def kv_reserved(self) -> int:
        return self.batcher.reserved()

    def kv_needed(self, prepared: PreparedEmbed) -> int:
        return self.batcher.reserved(prepared.kv_tokens) - self.kv_reserved

    @property
    def stored_cache_bytes(self) -> int:
        return 0

    def trim_prompt_cache(self, limit: int) -> None:
        return None

    def add(self, prepared: Any, sink: Sink, load_duration: float = 0.0) -> None:
        if not isinstance(prepared, PreparedEmbed):
            raise BadRequest(f"\"{self.name}\" does not support generate")
        self.batcher.add(prepared, sink, load_duration)

    def has_work(self) -> bool:
        return bool(self.batcher.jobs)

    def step(self, now: Optional[float] = None) -> int:
        self.batcher.expire(time.monotonic() if now is None else now)
        return 0

    def prefill_jobs(self) -> list[Any]:
        return self.batcher.pending()

    def prefill(self, job: Any, n: int) -> int:
        return self.batcher.run(job, n)

    def fail_prefill(self, job: Any, exc: Exception) -> None:
        self.fail(job.request_id, InternalError(f"embedding failed for this request: {exc}"))

    def cancel(self, request_id: int) -> bool:
        return self.batcher.end(request_id, None)

    def fail(self, request_id: int, error: MlxServerError) -> bool:
        return self.batcher.end(request_id, Failed(request_id, error))

    def fail_all(self, error: MlxServerError) -> None:
        self.batcher.fail_all(error)

    def close(self) -> None:
        self.batcher.fail_all(MlxServerError(f"model \"{self.name}\" was unloaded"))
        self.embedder = None  # type: ignore[assignment]


__all__ = ["EmbedBatcher", "EmbedJob", "EmbedRunner", "decoder_forward"]
