"""What the API holds of the engine: the `EngineClient` façade and the frozen `EngineStatus` it publishes.

Handlers, /health, /api/ps, /metrics and /queue/stats read only these. The real engine (mlx_server.engine) and
the tests' FakeEngine both implement `EngineClient`, so routes never depend on how the engine is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional, Protocol, Sequence

from mlx_server.contract.events import Event
from mlx_server.contract.requests import EngineRequest


@dataclass(frozen=True)
class EngineCounters:
    """Replaced whole by the inference thread, never mutated, so any thread may read it."""

    active_requests: int = 0  # sequences started (prefilling, decoding, or parked behind a load)
    queue_size: int = 0
    total_queued: int = 0
    total_processed: int = 0
    steps: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    prefill_tokens: int = 0  # prompt tokens run through a model (cached prefixes excluded)
    prefill_chunks: int = 0
    prefill_slices: int = 0  # engine iterations that ran prefill (each at most one slice long)
    by_priority: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class ModelStatus:
    """One resident (or loading) model."""

    name: str
    size: int  # weight bytes
    context_length: int
    loaded_at: float  # time.monotonic()
    load_seconds: float
    last_used: float
    expires_at: Optional[float]  # monotonic; None = never
    active: int  # requests using it now
    use_count: int
    kv_reserved: int = 0  # bytes of KV reserved for its running sequences
    prompt_cache: int = 0  # bytes of stored prompt caches
    is_loading: bool = False
    shards: int = 1  # ranks it is split across when served distributed
    split: str = ""  # "tensor" or "pipeline"
    kv_cache: str = "f16"  # how its KV is stored: f16 (the weights' float type), q8 or q4
    kv_bytes_per_token: int = 0  # on this rank
    draft: str = ""  # speculative decoding: its draft model's name, "prompt-lookup", or "" (none)


@dataclass(frozen=True)
class PrefillProgress:
    """A prompt still being prefilled: `prefilled` of its `total` tokens are in its KV (a cached prefix counts)."""

    request_id: int
    model: str
    prefilled: int
    total: int
    priority: int = 1


@dataclass(frozen=True)
class PoolStats:
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    unloads: int = 0
    load_seconds: float = 0.0


@dataclass(frozen=True)
class MemoryStatus:
    """The budget and what holds it: weights + reserved KV + stored prompt caches never exceed `budget`."""

    budget: int = 0
    weights: int = 0
    kv_reserved: int = 0
    prompt_cache: int = 0
    mlx_active: int = 0  # MLX's own allocator, read on the inference thread
    mlx_peak: int = 0
    mlx_cache: int = 0

    @property
    def used(self) -> int:
        return self.weights + self.kv_reserved + self.prompt_cache


@dataclass(frozen=True)
class RankStatus:
    """One rank of a distributed group, as of the last step plan it took part in."""

    rank: int
    pid: int
    free_bytes: int  # the memory its OS reported free
    last_seen: float  # monotonic on the reporting rank


@dataclass(frozen=True)
class WorldStatus:
    """The distributed group this engine runs in (absent when it runs alone)."""

    backend: str
    size: int
    rank: int
    ranks: tuple[RankStatus, ...] = ()
    plans: int = 0  # step plans exchanged
    plan_bytes: int = 0
    last_plan_bytes: int = 0
    largest_plan_bytes: int = 0
    exchange_seconds: float = 0.0  # spent in the plan exchange, all iterations together
    broken: Optional[str] = None  # why the group stopped working (a rank died or hung)


@dataclass(frozen=True)
class EngineStatus:
    alive: bool = False
    fatal: Optional[str] = None  # why the inference thread died, if it did
    draining: bool = False
    in_flight: int = 0  # requests accepted and not finished (preparing, queued, loading or generating)
    counters: EngineCounters = field(default_factory=EngineCounters)
    models: tuple[ModelStatus, ...] = ()
    pool: PoolStats = field(default_factory=PoolStats)
    memory: MemoryStatus = field(default_factory=MemoryStatus)
    prefill: tuple[PrefillProgress, ...] = ()  # prompts admitted and not yet decoding
    load_errors: tuple[tuple[str, str], ...] = ()  # (model, why its last load or import failed); cleared by a load
    world: Optional[WorldStatus] = None  # the distributed group, when there is one

    @property
    def prefill_queue_tokens(self) -> int:
        """Prompt tokens admitted and not yet prefilled."""
        return sum(p.total - p.prefilled for p in self.prefill)

    def model(self, name: str) -> Optional[ModelStatus]:
        return next((m for m in self.models if m.name == name and not m.is_loading), None)


Observer = Callable[[EngineRequest, Event], None]


class EngineClient(Protocol):
    """All the API may do with an engine."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def drain(self) -> None:
        """Refuse new requests (503) from now on; those in flight finish."""

    def status(self) -> EngineStatus: ...

    def stream(self, request: EngineRequest) -> AsyncIterator[Event]:
        """The request's events through Done or Failed; closing the iterator early cancels the request.

        Raises MlxServerError before the first event for a refusal (queue full, draining, engine dead).
        """

    def preload(self, names: Sequence[str]) -> None: ...

    def forget(self, name: str) -> None:
        """`name`'s files changed (a created model was replaced or deleted): read them again on its next use."""

    def observe(self, observer: Observer) -> None:
        """Call `observer` for every event (on the inference thread; it must be quick and must not raise)."""
