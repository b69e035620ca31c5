"""The job interface: what the inference loop knows of any kind of request, and of the workers that serve them.

The loop (core, admission, budget, intake, the distributed seam) handles jobs through these protocols only and
never asks what kind of request a job is. Each kind (engine/kinds/) implements them: a prepared request becomes a
`Job`; a job that needs a resident model names its `kind`, and every resident model carries one `Worker` per kind
it can serve (generation's batch, the embedding batcher, ...). A new kind is a new module there, registered once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Literal, Optional, Protocol, Sequence, Union

from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Event, Sink
from mlx_server.contract.requests import EngineRequest

if TYPE_CHECKING:
    from mlx_server.engine.loop.pool import ModelPool
    from mlx_server.engine.prepare.stage import Preparer

Outcome = Literal["started", "parked", "blocked"]  # parked: behind a load; blocked: memory held by running work


class Job(Protocol):
    """A request ready for the inference thread: prepared off it, so admitting it does no disk or CPU work."""

    @property
    def request(self) -> EngineRequest: ...

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        """Start now if it can. Raises MlxServerError to fail only this request."""
        ...

    def wire(self) -> Job:
        """Distributed: this job as it travels to the other ranks (no sinks, no per-rank state)."""
        ...

    def for_rank(self, preparer: Preparer) -> Job:
        """Distributed: a follower's copy of rank 0's job, with its per-rank state (a compiled grammar) made here."""
        ...


class ModelJob(Protocol):
    """A job that runs on a resident model's worker (generation, embedding, ...)."""

    @property
    def request(self) -> EngineRequest: ...

    @property
    def kv_tokens(self) -> int:
        """Tokens of memory it can hold at most (KV, or a forward pass's activations): what its message names."""
        ...


class Work(Protocol):
    """What a worker holds of one admitted job while it prefills (prompt tokens, or inputs to embed): the prefill
    scheduler ranks and slices these without knowing their kind."""

    done: int
    cached: int  # of `done`, what came from a stored cache
    started: Optional[float]  # perf_counter of its first chunk
    logged: float  # perf_counter of its last progress line
    chunks: int
    last_chunk: int  # tokens in its previous chunk

    @property
    def request_id(self) -> int: ...

    @property
    def model(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def enqueued(self) -> float: ...

    @property
    def size(self) -> int: ...

    @property
    def remaining(self) -> int: ...


class Worker(Protocol):
    """One kind of work on one resident model. Only the inference thread calls it."""

    name: str  # the model's

    @property
    def reserved(self) -> int:
        """Bytes held for admitted work beside the weights (KV, activations): counted against the budget."""
        ...

    @property
    def stored(self) -> int:
        """Bytes kept for later requests (stored prompt caches): counted, and given up first when room is needed."""
        ...

    def trim(self, limit: int) -> None:
        """Hold what is stored to `limit` bytes."""
        ...

    def needed(self, job: Any) -> int:
        """How much `reserved` grows if `job` joins."""
        ...

    def footprint(self, job: Any) -> int:
        """What `job` alone would hold beside the weights."""
        ...

    def add(self, job: Any, sink: Sink, load_seconds: float) -> None:
        """Admit `job`; it publishes into `sink`. Raises MlxServerError for the caller."""
        ...

    def has_work(self) -> bool: ...

    @property
    def joining(self) -> bool:
        """Work that just joined is owed its first result before more prefill runs."""
        ...

    def step(self, now: float) -> int:
        """One step of everything running (expiring what timed out at `now`); returns tokens made."""
        ...

    def prefill_jobs(self) -> Sequence[Work]: ...

    def prefill(self, job: Any, n: int) -> int:
        """Run about `n` tokens of `job`; returns how many ran."""
        ...

    def fail_prefill(self, job: Any, exc: Exception) -> None: ...

    def cancel(self, request_id: int) -> bool: ...

    def fail_all(self, error: MlxServerError) -> None: ...

    def close(self) -> None: ...


@dataclass
class Model:
    """A resident model: its workers by kind (in registration order) and what the status snapshot shows of it."""

    name: str
    workers: dict[str, Worker]
    context_length: int
    shards: int = 1  # ranks it is split across (distributed)
    split: str = ""  # how: "tensor" or "pipeline"
    resources: Any = None  # what the loader keeps to free it (weights, tokenizer)
    kv_cache: str = "f16"  # how its KV is stored (f16, q8, q4)
    kv_per_token: int = 0  # bytes of KV one token of context takes on this rank
    draft: str = ""  # what drafts its tokens: a draft model's name, "prompt-lookup", or "" (none)

    def has_work(self) -> bool:
        return any(w.has_work() for w in self.workers.values())

    @property
    def reserved(self) -> int:
        return sum(w.reserved for w in self.workers.values())

    @property
    def stored(self) -> int:
        return sum(w.stored for w in self.workers.values())

    @property
    def joining(self) -> bool:
        return any(w.joining for w in self.workers.values())

    def prefill_jobs(self) -> list[Work]:
        return [job for w in self.workers.values() for job in w.prefill_jobs()]

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


class Admitting(Protocol):
    """What a job may use of the loop while it is admitted (implemented by the core)."""

    @property
    def pool(self) -> ModelPool[Model]: ...

    def run_on_model(
        self,
        job: ModelJob,
        kind: str,
        unsupported: MlxServerError,
        reserve: int,
        load_seconds: float,
        keep_alive: Optional[float],
    ) -> Outcome:
        """Run `job` on its model's `kind` worker: the model loaded first if need be (reserving `reserve` bytes
        beside its weights), memory made for it, then handed to the worker. When it ends, its model stays
        resident for `keep_alive` seconds (None: the model's or the server's default)."""
        ...

    def end(self, request_id: int, event: Event) -> None: ...

    def keep_alive(self, name: str, requested: Optional[float]) -> float:
        """Ollama's order: the request's keep_alive, else the model's, else the server default."""
        ...


class Loader(Protocol):
    """Makes resident models from configured names (engine/model/loader.py), in slices or at once."""

    def load(self, name: str) -> Union[Model, Generator[None, None, Model]]: ...

    def estimate(self, name: str) -> int: ...

    def unload(self, model: Model) -> None: ...


@dataclass(frozen=True)
class Owned:
    """A request admitted into one of a model's workers, until it ends."""

    model: str
    keep_alive: Optional[float]  # the request's own; None: the model's or the server's


__all__ = ["Admitting", "Job", "Loader", "Model", "ModelJob", "Outcome", "Owned", "Work", "Worker"]
