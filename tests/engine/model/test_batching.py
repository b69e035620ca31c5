"""Continuous batching, prompt cache, admission order and limits on the real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from mlx_lm import load

from support.enginetools import add, submit, until
from mlx_server.engine.engine import Engine
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.contract.errors import RequestTimeout, ServerBusy
from mlx_server.contract.events import Delta, Done, Failed
from mlx_server.contract.requests import GenerateRequest, Priority, SamplingParams
from support.serving import make_config, serve

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["The river", "A long time ago in a valley", "Numbers: 1 2 3", "Hello", "What is the tallest mountain?",
           "café ✓", "def main():", "Once upon a time there was a small village by the sea"]


def drive(runner: GenerateWorker, reqs: list[GenerateRequest]) -> dict[int, str]:
    texts = {r.request_id: "" for r in reqs}

    def sink(e: Any) -> None:
        if isinstance(e, Delta):
            texts[e.request_id] += e.content

    for r in reqs:
        add(runner, r, sink)
    while runner.has_work():
        runner.step()
    return texts


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def model(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return load(str(request.getfixturevalue(request.param)))


def test_batched_equals_unbatched_greedy(model: tuple[Any, Any]) -> None:
    def reqs() -> list[GenerateRequest]:
        return [GenerateRequest(model="m", prompt=p, raw=True, sampling=GREEDY, max_tokens=16 + i)
                for i, p in enumerate(PROMPTS)]

    alone = {}
    for r in reqs():
        runner = GenerateWorker("m", *model, 2048, max_batch=8, prompt_cache_bytes=0)  # no cache: truly alone
        alone[r.prompt] = drive(runner, [r])[r.request_id]
    together_reqs = reqs()
    runner = GenerateWorker("m", *model, 2048, max_batch=8, prompt_cache_bytes=0)
    together = drive(runner, together_reqs)
    assert {r.prompt: together[r.request_id] for r in together_reqs} == alone
    assert len(set(alone.values())) == len(PROMPTS)


def test_mixed_sampling_settings_share_a_batch(model: tuple[Any, Any]) -> None:
    runner = GenerateWorker("m", *model, 2048, max_batch=8)
    greedy = GenerateRequest(model="m", prompt="The river", raw=True, sampling=GREEDY, max_tokens=20)
    want = drive(GenerateWorker("m", *model, 2048, max_batch=8), [greedy])[greedy.request_id]
    mixed = [GenerateRequest(model="m", prompt="The river", raw=True, sampling=GREEDY, max_tokens=20),
             GenerateRequest(model="m", prompt="x", raw=True, max_tokens=20,
                             sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1)),
             GenerateRequest(model="m", prompt="y", raw=True, max_tokens=20, stop=("e",),
                             sampling=SamplingParams(temperature=1.2, top_k=5, repeat_penalty=1.3, seed=2))]
    texts = drive(runner, mixed)
    assert texts[mixed[0].request_id] == want
    assert "e" not in texts[mixed[2].request_id]


def test_prompt_cache_reuse_and_byte_cap(model: tuple[Any, Any]) -> None:
    runner = GenerateWorker("m", *model, 2048, max_batch=8)
    base = "shared prefix " * 20
    first = GenerateRequest(model="m", prompt=base + "one", raw=True, sampling=GREEDY, max_tokens=4)
    drive(runner, [first])
    started: list[Any] = []
    second = GenerateRequest(model="m", prompt=base + "two", raw=True, sampling=GREEDY, max_tokens=4)
    add(runner, second, started.append)
    while runner.has_work():
        runner.step()
    assert started[0].cached_tokens > 30
    cold = GenerateWorker("m", *model, 2048, max_batch=8, prompt_cache_bytes=0)
    twin = GenerateRequest(model="m", prompt=base + "two", raw=True, sampling=GREEDY, max_tokens=4)
    assert "".join(e.content for e in started if isinstance(e, Delta)) == drive(cold, [twin])[twin.request_id]
    assert cold.prompt_cache.nbytes == 0  # a zero cap keeps nothing
    capped = GenerateWorker("m", *model, 2048, max_batch=8, prompt_cache_bytes=200_000)
    for i in range(12):
        drive(capped, [GenerateRequest(model="m", prompt=f"{i} " + base, raw=True, sampling=GREEDY, max_tokens=8)])
        assert capped.prompt_cache.nbytes <= 200_000


def test_stored_prompt_caches_hold_only_what_they_count(model: tuple[Any, Any]) -> None:
    import gc

    import mlx.core as mx

    runner = GenerateWorker("m", *model, 2048, max_batch=8, prompt_cache_bytes=2 * 2**20)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    for i in range(20):  # batches of 6, so each stored cache is cut out of a shared batch buffer
        drive(runner, [GenerateRequest(model="m", prompt=f"{i} {j} hello there", raw=True, sampling=GREEDY,
                                       max_tokens=12) for j in range(6)])
    gc.collect()
    mx.clear_cache()
    stored = runner.prompt_cache.nbytes
    assert stored > 0
    assert mx.get_active_memory() - base < 1.5 * stored + 2**20


@pytest.fixture
def engine(tiny_llama: Path, tmp_path: Path) -> Iterator[Engine]:
    config = make_config(tmp_path, {"m": {"source": str(tiny_llama)}}, max_concurrent=1, max_queue=3)
    e = Engine(config)
    e.start()
    yield e
    e.stop()


def test_priority_orders_the_wait_list(engine: Engine) -> None:
    blocker = submit(engine, "m", max_tokens=100000)
    blocker.first_delta()
    low = submit(engine, "m", max_tokens=2, priority=Priority.LOW)
    medium = submit(engine, "m", max_tokens=2, priority=Priority.MEDIUM)
    high = submit(engine, "m", max_tokens=2, priority=Priority.HIGH)
    assert until(lambda: engine.status().counters.queue_size == 3)
    engine.cancel(blocker.request.request_id)
    for w in (low, medium, high):
        assert isinstance(w.wait(), Done)
    finished = [n for n, w in sorted([("low", low), ("medium", medium), ("high", high)], key=lambda nw: nw[1].ended_at)]
    # with one sequence at a time, each waited for the ones before it: high ran first, low last
    assert finished == ["high", "medium", "low"]
    assert engine.status().counters.by_priority[Priority.HIGH] == 1


def test_full_queue_is_refused(engine: Engine) -> None:
    blocker = submit(engine, "m", max_tokens=100000)
    blocker.first_delta()
    waiting = [submit(engine, "m", max_tokens=1) for _ in range(3)]
    with pytest.raises(ServerBusy):
        submit(engine, "m", max_tokens=1)
    engine.cancel(blocker.request.request_id)
    assert all(isinstance(w.wait(), Done) for w in waiting)
    assert isinstance(submit(engine, "m", max_tokens=1).wait(), Done)


def test_timeout_stops_generation(engine: Engine) -> None:
    w = submit(engine, "m", max_tokens=10**6, timeout=0.3)
    end = w.wait(timeout=10)
    assert isinstance(end, Failed) and isinstance(end.error, RequestTimeout)
    assert until(lambda: engine.status().counters.active_requests == 0)


def test_timeout_while_waiting(engine: Engine) -> None:
    blocker = submit(engine, "m", max_tokens=100000)
    blocker.first_delta()
    queued = submit(engine, "m", max_tokens=5, timeout=0.3)
    end = queued.wait(timeout=10)
    assert isinstance(end, Failed) and isinstance(end.error, RequestTimeout) and "waiting" in end.error.message
    assert engine.status().counters.queue_size == 0
    engine.cancel(blocker.request.request_id)


def test_busy_is_503_over_http(tiny_llama: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"m": {"source": str(tiny_llama)}}, max_concurrent=1, max_queue=0)
    with serve(config) as server:
        with httpx.stream("POST", f"{server.url}/api/generate", json={
                "model": "m", "prompt": "x", "options": {"num_predict": 10**6}}) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)
            busy = httpx.post(f"{server.url}/api/generate", json={"model": "m", "prompt": "y"})
            assert busy.status_code == 503 and busy.json() == {"error": "server busy, retry later"}
            assert httpx.get(f"{server.url}/health").status_code == 200
            assert httpx.get(f"{server.url}/api/tags").status_code == 200
