"""Resident models: an LRU under a byte budget and a model count, with refcounts and keep_alive.

The pool is owned by the inference thread; nothing here locks. A load is a job the engine advances in slices
between decode steps, so loading one model stalls other models' streams by at most one slice. One load runs at
a time: a request for a model being loaded (or for another cold model meanwhile) waits, which makes loads
single-flight by construction. HTTP handlers read `snapshot()`, an immutable copy replaced after every change.
The clock and the loader are injected so tests can drive expiry, slow loads and failures deterministically.
A loader returns either the model itself or a generator that yields between slices and returns the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Generator, Generic, NoReturn, Optional, TypeVar, Union

from mlx_server.errors import InsufficientMemory, MlxServerError, ModelLoadFailed

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


@dataclass(frozen=True)
class ResidentInfo:
    name: str
    size: int
    loaded_at: float
    load_seconds: float
    last_used: float
    expires_at: Optional[float]
    active: int
    use_count: int
    is_loading: bool = False


@dataclass(frozen=True)
class PoolStats:
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    unloads: int = 0
    load_seconds: float = 0.0


class ModelPool(Generic[M]):
    def __init__(self, *, budget: int, max_models: int, loader: Callable[[str], Union[M, LoadJob]],
                 estimate: Callable[[str], int], unloader: Callable[[M], None],
                 clock: Callable[[], float] = time.monotonic,
                 available: Optional[Callable[[], int]] = None) -> None:
        self.budget = budget
        self.max_models = max_models
        self._loader = loader
        self._estimate = estimate
        self._unloader = unloader
        self._clock = clock
        self._available = available
        self._resident: dict[str, Resident[M]] = {}  # insertion order = LRU order (oldest first)
        self._loading: Optional[_Loading[M]] = None
        self.stats = PoolStats()
        self._snapshot: tuple[ResidentInfo, ...] = ()

    # ---- queries (any thread reads snapshot / stats; the rest is inference-thread only) ------------------

    def snapshot(self) -> tuple[ResidentInfo, ...]:
        return self._snapshot

    def get(self, name: str) -> Optional[Resident[M]]:
        return self._resident.get(name)

    def resident_bytes(self) -> int:
        return sum(r.size for r in self._resident.values())

    def names(self) -> list[str]:
        return list(self._resident)

    # ---- loading and eviction -----------------------------------------------------------------------------

    @property
    def loading(self) -> Optional[str]:
        return self._loading.name if self._loading else None

    def request(self, name: str) -> Optional[Resident[M]]:
        """The resident model (now most recently used), or None while it loads.

        A cold model starts loading when no other load is running; otherwise the caller waits and asks again
        once the current load finishes. Raises InsufficientMemory when it can never fit right now.
        """
        hit = self._resident.get(name)
        if hit is not None:
            self._resident[name] = self._resident.pop(name)  # most recently used goes last
            return hit
        if self._loading is not None:
            return None
        need = self._estimate(name)
        self._make_room(name, need)
        self._loading = _Loading(name=name, job=None, size=need, started=self._clock())
        self._publish()
        try:
            produced = self._loader(name)
        except BaseException as exc:
            self._fail_load(exc)
        if isinstance(produced, Generator):
            self._loading.job = produced
        else:
            self._loading.result = produced
        return None

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
            except BaseException as exc:
                self._fail_load(exc)
        self._loading = None
        now = self._clock()
        seconds = now - current.started
        entry = Resident(name=current.name, model=current.result, size=current.size, loaded_at=now,
                         load_seconds=seconds, last_used=now, expires_at=None, keep_alive=FOREVER)
        self._resident[current.name] = entry
        self.stats = replace(self.stats, loads=self.stats.loads + 1, load_seconds=self.stats.load_seconds + seconds)
        log.info("loaded %s in %.2fs (%.2f GB; resident %.2f / %.2f GB)", current.name, seconds, current.size / 1e9,
                 self.resident_bytes() / 1e9, self.budget / 1e9)
        self._publish()
        return entry

    def _fail_load(self, exc: BaseException) -> NoReturn:
        current = self._loading
        self._loading = None
        self.stats = replace(self.stats, load_failures=self.stats.load_failures + 1)
        self._publish()
        name = current.name if current else "?"
        if current is not None and current.job is not None:
            current.job.close()
        if isinstance(exc, MlxServerError):
            raise exc
        log.error("loading %s failed: %s", name, exc)
        raise ModelLoadFailed(f"failed to load model \"{name}\": {exc}") from exc

    def _make_room(self, name: str, need: int) -> None:
        if need > self.budget:
            raise InsufficientMemory(
                f"model \"{name}\" needs {need / 1e9:.2f} GB, more than the memory budget of "
                f"{self.budget / 1e9:.2f} GB")
        while self._resident and (len(self._resident) >= self.max_models
                                  or self.resident_bytes() + need > self.budget):
            victim = next((r for r in self._resident.values() if r.active == 0), None)
            if victim is None:
                raise InsufficientMemory(
                    f"model \"{name}\" needs {need / 1e9:.2f} GB but the memory budget of {self.budget / 1e9:.2f} GB "
                    f"is held by models with requests in flight ({self.resident_bytes() / 1e9:.2f} GB resident)")
            log.info("evicting %s (least recently used, idle) to make room for %s", victim.name, name)
            self._drop(victim.name)
            self.stats = replace(self.stats, evictions=self.stats.evictions + 1)
        if self._available is not None:
            free = self._available()
            if need > free:
                raise InsufficientMemory(
                    f"model \"{name}\" needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB of memory is available "
                    f"(budget {self.budget / 1e9:.2f} GB)")

    def _drop(self, name: str) -> None:
        entry = self._resident.pop(name)
        self._unloader(entry.model)
        self._publish()

    # ---- use and expiry -----------------------------------------------------------------------------------

    def acquire(self, name: str) -> None:
        entry = self._resident[name]
        entry.active += 1
        entry.use_count += 1
        entry.last_used = self._clock()
        entry.expires_at = None  # never expires while in use
        self._publish()

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
        else:
            self._publish()

    def sweep(self) -> list[str]:
        """Unload idle models whose keep_alive has passed; returns their names."""
        now = self._clock()
        expired = [r.name for r in self._resident.values()
                   if r.active == 0 and r.expires_at is not None and r.expires_at <= now]
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

    def _publish(self) -> None:
        infos = [ResidentInfo(name=r.name, size=r.size, loaded_at=r.loaded_at, load_seconds=r.load_seconds,
                              last_used=r.last_used, expires_at=r.expires_at, active=r.active,
                              use_count=r.use_count) for r in self._resident.values()]
        if self._loading is not None:
            infos.append(ResidentInfo(name=self._loading.name, size=self._loading.size, loaded_at=0.0, load_seconds=0.0,
                                      last_used=0.0, expires_at=None, active=0, use_count=0, is_loading=True))
        self._snapshot = tuple(infos)
