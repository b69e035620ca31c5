"""The model pool through the real engine and loader: LRU under a byte budget, in-flight protection,
single-flight loads, keep_alive with an injected clock, failed loads, and memory really returned."""

from __future__ import annotations

import queue
import shutil
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import pytest

from support.enginetools import control, submit, until
from mlx_server.engine.engine import Engine
from mlx_server.contract.errors import InsufficientMemory, ModelLoadFailed
from mlx_server.contract.events import Done, Failed
from mlx_server.contract.requests import LoadRequest, Priority, SamplingParams, UnloadRequest
from support.serving import make_config
from support.tinymodels import build_tiny_model

MB = 1_000_000
GREEDY = SamplingParams(temperature=0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight tiny models whose on-disk sizes differ (1..8 MB of padding)."""
    root = tmp_path_factory.mktemp("eight")
    return {f"m{i}": build_tiny_model(root / f"m{i}", seed=i, padding_bytes=(i + 1) * MB) for i in range(8)}


def start_engine(tmp: Path, models: dict[str, Path], clock: Any = None, **server: Any) -> Engine:
    config = make_config(tmp, {n: {"source": str(p)} for n, p in models.items()}, **server)
    engine = Engine(config, clock=clock) if clock else Engine(config)
    engine.start()
    return engine


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[Any]:
    engines: list[Engine] = []

    def make(models: dict[str, Path], **kw: Any) -> Engine:
        engine = start_engine(tmp_path, models, **kw)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop()


def test_lru_eviction_under_budget(eight: dict[str, Path], engine_factory: Any) -> None:
    engine = engine_factory(eight, memory_budget="16MB", max_loaded_models=8)
    sizes = {n: engine.loader.estimate(n) for n in eight}
    budget = engine.core.pool.budget.limit
    order: list[str] = []  # our own LRU model of what should be resident
    sweep = ["m0", "m1", "m2", "m0", "m3", "m4", "m1", "m5", "m6", "m7", "m2", "m0"]
    for name in sweep:
        assert isinstance(submit(engine, name, max_tokens=2, sampling=GREEDY).wait(), Done)
        if name in order:
            order.remove(name)
        else:
            while order and sum(sizes[n] for n in order) + sizes[name] > budget:
                order.pop(0)  # least recently used goes first
        order.append(name)
        resident = engine.core.pool.names()
        assert resident == order, (name, resident, order)
        assert engine.core.pool.resident_bytes() <= budget
    assert engine.core.pool.stats.evictions > 3


def test_max_loaded_models(eight: dict[str, Path], engine_factory: Any) -> None:
    engine = engine_factory(eight, memory_budget="1GB", max_loaded_models=2)
    for name in ("m0", "m1", "m2"):
        submit(engine, name, max_tokens=1).wait()
    assert engine.core.pool.names() == ["m1", "m2"]


def test_in_flight_model_is_never_evicted(eight: dict[str, Path], engine_factory: Any) -> None:
    engine = engine_factory(eight, memory_budget="16MB", max_loaded_models=8)
    long = submit(engine, "m6", max_tokens=100000, sampling=GREEDY)  # ~7.5 MB, busy for seconds
    long.first_delta()
    # m7 (~8.5 MB) only fits by evicting m6, which is busy: it waits, and m6 keeps generating.
    big = submit(engine, "m7", max_tokens=2)
    with pytest.raises(queue.Empty):
        big.events.get(timeout=0.5)
    assert engine.core.pool.names() == ["m6"]
    assert engine.status().counters.queue_size == 1
    # a small model still fits beside it (HIGH goes ahead of the waiting m7)
    assert isinstance(submit(engine, "m0", max_tokens=2, priority=Priority.HIGH).wait(), Done)
    assert "m6" in engine.core.pool.names()
    assert not any(isinstance(e, (Done, Failed)) for e in long.seen)
    engine.cancel(long.request.request_id)
    assert isinstance(long.wait(), Done)
    done = big.wait()
    assert isinstance(done, Done) and done.usage.total_duration >= 0.5  # its wait counts, as Ollama reports it
    assert "m6" not in engine.core.pool.names()  # now m6 is idle and could go


def test_model_larger_than_budget_is_refused(eight: dict[str, Path], engine_factory: Any) -> None:
    engine = engine_factory(eight, memory_budget="3MB")
    failed = submit(engine, "m7").wait()
    assert isinstance(failed, Failed) and isinstance(failed.error, InsufficientMemory)
    assert "more than the memory budget" in failed.error.message
    assert engine.alive


def test_concurrent_first_requests_cause_one_load(eight: dict[str, Path], engine_factory: Any) -> None:
    engine = engine_factory(eight)
    waiters = [submit(engine, "m3", prompt=f"prompt {i}", max_tokens=4) for i in range(16)]
    results = [w.wait() for w in waiters]
    assert all(isinstance(r, Done) for r in results)
    assert engine.core.pool.stats.loads == 1
    # every request that waited for the load reports it
    # (prompts are prepared concurrently, so a late one may find the model already resident)
    waited = [r.usage.load_duration for r in results if r.usage.load_duration > 0]  # type: ignore[union-attr]
    assert waited and all(d == pytest.approx(engine.core.pool.stats.load_seconds) for d in waited)


def test_keep_alive_with_injected_clock(eight: dict[str, Path], engine_factory: Any) -> None:
    clock = FakeClock()
    engine = engine_factory(eight, clock=clock, keep_alive="5m")
    submit(engine, "m0", max_tokens=1, keep_alive=10.0).wait()
    submit(engine, "m1", max_tokens=1).wait()  # server default: 5m
    submit(engine, "m2", max_tokens=1, keep_alive=-1.0).wait()  # forever
    assert set(engine.core.pool.names()) == {"m0", "m1", "m2"}
    clock.now += 11
    assert until(lambda: "m0" not in engine.core.pool.names())
    assert set(engine.core.pool.names()) == {"m1", "m2"}
    clock.now += 300
    assert until(lambda: engine.core.pool.names() == ["m2"])
    clock.now += 10**7
    submit(engine, "m3", max_tokens=1, keep_alive=0.0).wait()
    assert until(lambda: "m3" not in engine.core.pool.names())  # 0 = unload as soon as idle
    assert engine.core.pool.names() == ["m2"]


def test_load_only_and_unload_only(eight: dict[str, Path], engine_factory: Any) -> None:
    engine = engine_factory(eight)
    done = control(engine, LoadRequest("m4")).wait()
    assert isinstance(done, Done) and done.reason == "load" and "m4" in engine.core.pool.names()
    done = control(engine, UnloadRequest("m4")).wait()
    assert isinstance(done, Done) and done.reason == "unload"
    assert engine.core.pool.names() == []


def test_corrupt_weights_fail_that_model_only(eight: dict[str, Path], tmp_path: Path, engine_factory: Any) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(eight["m0"], broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    engine = engine_factory({"broken": broken, "good": eight["m1"]})
    for _ in range(2):  # and again: a failed load leaves nothing behind
        failed = submit(engine, "broken").wait()
        assert isinstance(failed, Failed) and isinstance(failed.error, ModelLoadFailed)
        assert '"broken"' in failed.error.message
    assert isinstance(submit(engine, "good", max_tokens=3).wait(), Done)
    assert engine.alive and engine.core.pool.stats.load_failures == 2


def test_unload_returns_memory(tmp_path: Path, engine_factory: Any) -> None:
    big = build_tiny_model(tmp_path / "big", hidden_size=512, num_layers=4, seed=3)
    engine = engine_factory({"big": big})
    mx.clear_cache()
    before = mx.get_active_memory()
    submit(engine, "big", max_tokens=4, keep_alive=-1.0).wait()
    loaded = mx.get_active_memory()
    assert loaded - before > 20 * MB
    assert control(engine, UnloadRequest("big")).wait().reason == "unload"  # type: ignore[union-attr]
    assert until(lambda: mx.get_active_memory() - before < 0.1 * (loaded - before), timeout=5)
