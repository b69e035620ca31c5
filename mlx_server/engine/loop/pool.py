"""Resident models: an LRU under a byte budget and a model count, with refcounts and keep_alive.

The pool is owned by the inference thread; nothing here locks. A load is a job the engine advances in slices
between decode steps, so loading one model stalls other models' streams by at most one slice. One load runs at
a time: a request for a model being loaded (or for another cold model meanwhile) waits, which makes loads
single-flight by construction. The engine publishes what handlers see (EngineStatus) from it.
The clock and the loader are injected so tests can drive expiry, slow loads and failures deterministically.
A loader returns either the model itself or a generator that yields between slices and returns the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Generator, Generic, Literal, NoReturn, Optional, TypeVar, Union, cast

from mlx_server.contract.errors import MlxServerError, ModelLoadFailed
from mlx_server.contract.status import PoolStats
from mlx_server.engine.loop.budget import Budget

log = logging.getLogger("mlx_server.pool")

M = TypeVar("M")
FOREVER = -1.0
LoadJob = Generator[None, None, M]


@dataclass
class _Loading(Generic[M]):
    name: str
    job: Optional[LoadJob]
    size: int
    started: float
    result: Optional[M] = None


@dataclass
class Resident(Generic[M]):
    name: str
    model: M
    size: int
    loaded_at: float
    load_seconds: float
    last_used: float
    expires_at: Optional[float]  # None = never
    keep_alive: float
    active: int = 0
    use_count: int = 0


class ModelPool(Generic[M]):
    def __init__(
        self,
        *,
        budget: Budget,
        loader: Callable[[str], Union[M, LoadJob]],
        estimate: Callable[[str], int],
        unloader: Callable[[M], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget  # what counts against memory, and how room is made (engine/loop/budget.py)
        self._loader = loader
        self._estimate = estimate
        self._unloader = unloader
        self._clock = clock
        self._resident: dict[str, Resident[M]] = {}  # insertion order = LRU order (oldest first)
        self._loading: Optional[_Loading[M]] = None
        self.stats = PoolStats()

    # ---- queries (inference thread only, like everything here) ---------------------------------------------

    def residents(self) -> list[Resident[M]]:
        return list(self._resident.values())

    @property
    def loading_size(self) -> int:
        return self._loading.size if self._loading else 0

    def get(self, name: str) -> Optional[Resident[M]]:
        return self._resident.get(name)

    def resident_bytes(self) -> int:
        return sum(r.size for r in self._resident.values())

    def used_bytes(self) -> int:
        return self.budget.used(self)

    def make_room(self, need: int, keep: Optional[str] = None, extra_model: bool = False) -> bool:
        return self.budget.make_room(self, need, keep, extra_model)

    def names(self) -> list[str]:
        return list(self._resident)

    def evict(self, name: str) -> None:
        """Drop an idle model to make room (the budget decides which)."""
        self._drop(name)
        self.stats = replace(self.stats, evictions=self.stats.evictions + 1)

    # ---- loading and eviction -----------------------------------------------------------------------------

    @property
    def loading(self) -> Optional[str]:
        return self._loading.name if self._loading else None

    def request(self, name: str, reserve: int = 0) -> Union[Resident[M], Literal["loading", "blocked"]]:
        """The resident model (now most recently used); else "loading" once its load has started (or another
        load runs first), or "blocked" while the memory it needs is held by requests in flight.

        `reserve` is KV the first request will need on top of the weights. Raises InsufficientMemory when the
        model can never fit the budget.
        """
        hit = self._resident.get(name)
        if hit is not None:
            self._resident[name] = self._resident.pop(name)  # most recently used goes last
            return hit
        if self._loading is not None:
            return "loading"
        need = self._estimate(name)
        self.budget.check_load(name, need, reserve)
        if not self.make_room(need + reserve, extra_model=True):
            return "blocked"
        self.budget.check_available(name, need)
        self._loading = _Loading(name=name, job=None, size=need, started=self._clock())
        try:
            produced = self._loader(name)
        except BaseException as exc:  # noqa: BLE001 - _fail_load re-raises it as the load's failure
            self._fail_load(exc)
        if isinstance(produced, Generator):
            self._loading.job = produced
        else:
            self._loading.result = produced
        return "loading"

    def advance(self) -> Optional[Resident[M]]:
        """Run one slice of the current load; the new resident when it completes. Load errors propagate."""
        current = self._loading
        if current is None:
            return None
        if current.job is not None:
            try:
                next(current.job)
                return None
            except StopIteration as stop:
                current.result = stop.value
            except BaseException as exc:  # noqa: BLE001 - _fail_load re-raises it as the load's failure
                self._fail_load(exc)
        self._loading = None
        now = self._clock()
        seconds = now - current.started
        entry = Resident(
            name=current.name,
            model=cast(M, current.result),
            size=current.size,
            loaded_at=now,
            load_seconds=seconds,
            last_used=now,
            expires_at=None,
            keep_alive=FOREVER,
        )
        self._resident[current.name] = entry
        self.stats = replace(self.stats, loads=self.stats.loads + 1, load_seconds=self.stats.load_seconds + seconds)
        log.info(
            "loaded %s in %.2fs (%.2f GB; resident %.2f / %.2f GB)",
            current.name,
            seconds,
            current.size / 1e9,
            self.resident_bytes() / 1e9,
            self.budget.limit / 1e9,
        )
        return entry

    def _fail_load(self, exc: BaseException) -> NoReturn:
        current = self._loading
        self._loading = None
        self.stats = replace(self.stats, load_failures=self.stats.load_failures + 1)
        name = current.name if current else "?"
        if current is not None and current.job is not None:
            current.job.close()
        if isinstance(exc, MlxServerError):
            raise exc
        log.error("loading %s failed: %s", name, exc)
        raise ModelLoadFailed(f'failed to load model "{name}": {exc}') from exc

    def _drop(self, name: str) -> None:
        entry = self._resident.pop(name)
        self._unloader(entry.model)

    # ---- use and expiry -----------------------------------------------------------------------------------

    def acquire(self, name: str) -> None:
        entry = self._resident[name] = self._resident.pop(name)  # most recently used goes last
        entry.active += 1
        entry.use_count += 1
        entry.last_used = self._clock()
        entry.expires_at = None  # never expires while in use

    def preload(self, name: str, need: int) -> bool:
        """Start loading `name` if it fits beside what is resident without evicting anything; False if not."""
        if self.used_bytes() + need > self.budget.limit or len(self.names()) >= self.budget.max_models:
            log.info(
                "preload stopped at %s: it needs %.2f GB and the memory budget (%.2f of %.2f GB used, %d "
                "models) is reached",
                name,
                need / 1e9,
                self.used_bytes() / 1e9,
                self.budget.limit / 1e9,
                len(self.names()),
            )
            return False
        log.info("preloading %s", name)
        self.request(name)
        return True

    def release(self, name: str, keep_alive: float) -> None:
        """A request finished. keep_alive: seconds to stay resident once idle; 0 = unload now; <0 = forever."""
        entry = self._resident.get(name)
        if entry is None:
            return
        entry.active = max(0, entry.active - 1)
        entry.last_used = self._clock()
        self.set_keep_alive(name, keep_alive)

    def set_keep_alive(self, name: str, keep_alive: float) -> None:
        entry = self._resident.get(name)
        if entry is None:
            return
        entry.keep_alive = keep_alive
        entry.expires_at = None if keep_alive < 0 else self._clock() + keep_alive
        if entry.active == 0 and keep_alive == 0:
            self.unload(name)

    def sweep(self) -> list[str]:
        """Unload idle models whose keep_alive has passed; returns their names."""
        now = self._clock()
        expired = [
            r.name
            for r in self._resident.values()
            if r.active == 0 and r.expires_at is not None and r.expires_at <= now
        ]
        for name in expired:
            log.info("keep_alive expired for %s; unloading", name)
            self.unload(name)
        return expired

    def next_expiry(self) -> Optional[float]:
        times = [r.expires_at for r in self._resident.values() if r.active == 0 and r.expires_at is not None]
        return min(times) if times else None

    def unload(self, name: str) -> bool:
        entry = self._resident.get(name)
        if entry is None or entry.active:
            return False
        self._drop(name)
        self.stats = replace(self.stats, unloads=self.stats.unloads + 1)
        return True

    def unload_all(self) -> None:
        for name in list(self._resident):
            self._drop(name)
