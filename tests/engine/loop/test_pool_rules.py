"""The model pool and the budget on their own, with a fake loader and a fake clock: LRU, the budget and the model
count, all-or-nothing eviction, never evicting a model in use, keep_alive, single-flight sliced loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Union

import pytest

from mlx_server.contract.errors import InsufficientMemory, ModelLoadFailed
from mlx_server.engine.loop.budget import Budget, activation_bound, kv_bound, trim_stored_caches
from mlx_server.engine.loop.pool import ModelPool


@dataclass
class FakeModel:
    name: str
    held: int = 0  # bytes reserved beside the weights
    workers: dict = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Loader:
    sizes: dict[str, int]
    slices: int = 0  # a load yields this many times before it completes
    broken: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    def load(self, name: str) -> Union[FakeModel, Generator[None, None, FakeModel]]:
        self.calls.append(name)
        if name in self.broken:
            raise RuntimeError("bad weights")
        if not self.slices:
            return FakeModel(name)
        return self._sliced(name)

    def _sliced(self, name: str) -> Generator[None, None, FakeModel]:
        for _ in range(self.slices):
            yield
        return FakeModel(name)

    def unload(self, model: FakeModel) -> None:
        self.unloaded.append(model.name)


def make(budget: int = 100, max_models: int = 3, **loader_kw: object) -> tuple[ModelPool[FakeModel], Loader, Clock]:
    loader = Loader(sizes={f"m{i}": 40 for i in range(6)}, **loader_kw)  # type: ignore[arg-type]
    clock = Clock()
    pool: ModelPool[FakeModel] = ModelPool(budget=Budget(budget, max_models, held=lambda m: m.held),
                                           loader=loader.load, estimate=loader.sizes.__getitem__,
                                           unloader=loader.unload, clock=clock)
    return pool, loader, clock


def load(pool: ModelPool[FakeModel], name: str) -> None:
    assert pool.request(name) == "loading"
    while pool.advance() is None:
        pass


def test_the_least_recently_used_idle_model_makes_room() -> None:
    pool, loader, _ = make()
    load(pool, "m0")
    load(pool, "m1")
    pool.request("m0")  # m0 is now the most recently used
    load(pool, "m2")
    assert pool.names() == ["m0", "m2"] and loader.unloaded == ["m1"] and pool.stats.evictions == 1


def test_a_model_in_use_is_never_evicted_and_eviction_is_all_or_nothing() -> None:
    pool, loader, _ = make(budget=130)
    load(pool, "m0")
    load(pool, "m1")
    load(pool, "m2")
    pool.acquire("m0")
    pool.acquire("m1")
    pool.get("m0").model.held = 80  # type: ignore[union-attr]  # m0's requests hold 80 bytes of KV
    # Room for m3 would need m2 and one of the busy models: so nobody is evicted, and m3 waits.
    assert pool.request("m3") == "blocked"
    assert sorted(pool.names()) == ["m0", "m1", "m2"] and loader.unloaded == []
    pool.get("m0").model.held = 0  # type: ignore[union-attr]  # its requests ended
    assert pool.request("m3") == "loading" and loader.unloaded == ["m2"]  # the idle one, never the busy ones


def test_the_model_count_bounds_residents_too() -> None:
    pool, loader, _ = make(budget=10_000, max_models=2)
    load(pool, "m0")
    load(pool, "m1")
    load(pool, "m2")
    assert pool.names() == ["m1", "m2"] and loader.unloaded == ["m0"]


def test_a_model_that_can_never_fit_is_refused_with_the_numbers() -> None:
    pool, _, _ = make(budget=50)
    with pytest.raises(InsufficientMemory, match="m0.*more than the memory budget"):
        pool.request("m0", reserve=20)


def test_loads_run_in_slices_and_one_at_a_time() -> None:
    pool, loader, _ = make(slices=3)
    assert pool.request("m0") == "loading" and pool.loading == "m0"
    assert pool.request("m0") == "loading" and pool.request("m1") == "loading"  # single-flight, one load at once
    assert [pool.advance() for _ in range(3)] == [None, None, None]
    entry = pool.advance()
    assert entry is not None and entry.name == "m0" and pool.loading is None
    assert loader.calls == ["m0"]  # one load, however many asked


def test_a_failed_load_is_reported_and_leaves_the_pool_usable() -> None:
    pool, loader, _ = make(broken={"m0"})
    with pytest.raises(ModelLoadFailed, match="m0.*bad weights"):
        pool.request("m0")
    assert pool.loading is None and pool.stats.load_failures == 1
    load(pool, "m1")
    assert pool.names() == ["m1"]


def test_keep_alive_runs_on_the_clock_and_only_while_idle() -> None:
    pool, loader, clock = make()
    load(pool, "m0")
    pool.acquire("m0")
    clock.now += 1_000
    assert pool.sweep() == []  # in use: never expires
    pool.release("m0", keep_alive=5)
    assert pool.next_expiry() == clock.now + 5
    clock.now += 4
    assert pool.sweep() == []
    clock.now += 2
    assert pool.sweep() == ["m0"] and loader.unloaded == ["m0"]
    load(pool, "m1")
    pool.set_keep_alive("m1", 0)  # idle and 0: unloaded at once
    assert pool.names() == [] and pool.stats.unloads == 2


def test_preload_never_evicts() -> None:
    pool, loader, _ = make(budget=100)
    load(pool, "m0")
    load(pool, "m1")
    assert not pool.preload("m2", 40) and loader.unloaded == []


def test_kv_and_activation_bounds() -> None:
    assert kv_bound([], 10) == 0
    assert kv_bound([1], 10) == 2 * 256 * 10  # rounded up to the cache's growth step, twice for the copy
    assert kv_bound([300, 10], 1) == 2 * 2 * 512  # every row padded to the longest
    assert activation_bound(100, 50, 3) == 300  # small inputs: all in one pass
    assert activation_bound(100_000, 50, 1) == 8192  # a pass packs at most this many tokens
    assert activation_bound(100_000, 10_000, 1) == 10_000  # unless one input is longer


@dataclass
class Stored:
    stored: int

    def trim(self, limit: int) -> None:
        self.stored = min(self.stored, max(0, limit))


def test_stored_caches_give_way_first_least_recently_used_model_first() -> None:
    pool, _, _ = make(budget=200)
    load(pool, "m0")
    load(pool, "m1")
    old, new = Stored(30), Stored(30)
    pool.get("m0").model.workers = {"generate": old}  # type: ignore[union-attr]
    pool.get("m1").model.workers = {"generate": new}  # type: ignore[union-attr]
    trim_stored_caches(pool, pool.budget, cap=1_000, free=40)
    assert (old.stored, new.stored) == (0, 20)
    trim_stored_caches(pool, pool.budget, cap=5, free=0)  # the cap holds what is stored overall
    assert old.stored + new.stored <= 5
