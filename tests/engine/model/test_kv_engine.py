"""A quantized KV cache (models.yaml `kv_cache`) on the real engine: batched output equals each request alone at
the same setting, prefix-cache hits work on quantized caches, the budget counts the quantized bytes (so it holds
more concurrent context), status shows the setting, and a model that cannot use it keeps f16."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from mlx_server.contract.events import Delta, Done, Started
from mlx_server.contract.requests import GenerateRequest, SamplingParams
from mlx_server.engine.engine import Engine
from mlx_server.engine.model.kvquant import BatchQuantizedKVCache, SequenceQuantizedKVCache
from support.enginetools import Waiter, until
from support.serving import make_config
from support.tinymodels import build_tiny_model

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["The river bends", "Numbers: 1 2 3 4", "A long time ago in a valley far away", "Hello there"]


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Head size 64: quantization groups of 64 run along it.
    return build_tiny_model(tmp_path_factory.mktemp("kv64"), arch="llama", hidden_size=256, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def engine(tiny64: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    models: dict[str, Any] = {
        "f16": {"source": str(tiny64)},
        "q8": {"source": str(tiny64), "kv_cache": "q8_0"},
        "q4": {"source": str(tiny64), "kv_cache": "q4"},
        "small-heads": {"source": str(tiny_llama), "kv_cache": "q8"},  # head size 16: cannot be quantized
    }
    e = Engine(make_config(tmp_path_factory.mktemp("cfg"), models, max_loaded_models=4))
    e.start()
    yield e
    e.stop()


def run(engine: Engine, model: str, prompt: str, max_tokens: int = 16) -> Waiter:
    req = GenerateRequest(model=model, prompt=prompt, raw=True, sampling=GREEDY, max_tokens=max_tokens)
    w = Waiter(req)
    engine.submit(req, w)
    return w


def text(w: Waiter) -> str:
    end = w.wait(120)
    assert isinstance(end, Done), end
    return "".join(e.content for e in w.seen if isinstance(e, Delta))


def worker(engine: Engine, model: str) -> Any:
    entry = engine.core.pool.get(model)
    assert entry is not None
    return entry.model.workers["generate"]


@pytest.mark.parametrize("kv", ["q8", "q4"])
def test_batched_quantized_output_equals_each_alone(engine: Engine, kv: str) -> None:
    alone = {}
    for p in PROMPTS:
        alone[p] = text(run(engine, kv, p))
        worker(engine, kv).prompt_cache.trim_to(n_bytes=0)  # truly alone: nothing cached for the next
    waiters = {p: run(engine, kv, p) for p in PROMPTS}
    assert {p: text(w) for p, w in waiters.items()} == alone
    seen = worker(engine, kv)
    assert seen.kv == kv
    assert seen.prompt_cache.nbytes > 0  # the finished sequences' quantized caches were kept


def test_prefix_hits_on_quantized_caches(engine: Engine) -> None:
    base = "shared words " * 12
    first = text(run(engine, "q8", base + "one", 8))
    assert first
    again = run(engine, "q8", base + "two", 8)
    text(again)
    started = next(e for e in again.seen if isinstance(e, Started))
    assert started.cached_tokens > 20  # the shared prefix came from a stored quantized cache
    fetched, _ = worker(engine, "q8").prompt_cache.fetch_nearest_cache("q8", list(range(3)))
    assert fetched is None or all(isinstance(c, SequenceQuantizedKVCache) for c in fetched)


def test_budget_counts_quantized_bytes_and_status_shows_them(engine: Engine) -> None:
    for name in ("f16", "q8", "q4", "small-heads"):
        text(run(engine, name, "hi", 2))
    per_token = {r.name: r for r in engine.status().models}
    f16, q8, q4 = (per_token[n].kv_bytes_per_token for n in ("f16", "q8", "q4"))
    assert (per_token["q8"].kv_cache, per_token["q4"].kv_cache) == ("q8", "q4")
    assert q4 < q8 < f16
    # float32 tiny model: q8 stores 1 byte + scale/bias per 64 (4 bytes each) vs 4 bytes per element
    assert q8 / f16 == pytest.approx((64 + 8) / 256)
    # One budget of KV holds correspondingly more concurrent 4,096-token sequences.
    budget = 64 * 2**20
    fits = {n: budget // worker(engine, n).kv_bytes([4096]) for n in ("f16", "q8", "q4")}
    assert fits["q4"] > fits["q8"] > fits["f16"]
    # A model whose head size cannot be grouped by 64 keeps f16 (and says so in the log).
    assert per_token["small-heads"].kv_cache == "f16"
    assert worker(engine, "small-heads").kv == "f16"


def test_the_batch_really_holds_quantized_kv(engine: Engine) -> None:
    w = run(engine, "q8", "a longer generation to watch", 48)
    w.first_delta()
    gen = worker(engine, "q8").generator
    assert until(lambda: any(isinstance(c, BatchQuantizedKVCache) for c in (gen._generation_batch.prompt_cache or [])))
    text(w)
