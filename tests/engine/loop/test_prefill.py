"""Chunked, time-sliced prefill: identical greedy output, running streams keep going, short prompts go first,
and cancellation or a timeout stops a long prefill within one slice."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from mlx_lm import load

from support.enginetools import Waiter, submit, until
from mlx_server.engine.engine import Engine
from mlx_server.engine.loop.prefill import Prefiller
from mlx_server.engine.prepare.stage import prepare_request
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.contract.errors import RequestTimeout
from mlx_server.contract.events import Delta, Done, Failed, Started
from mlx_server.contract.requests import GenerateRequest, Priority, SamplingParams
from support.serving import make_config
from support.tinymodels import build_tiny_model, reference_greedy

GREEDY = SamplingParams(temperature=0.0)
WORDS = ("river", "stone", "apple", "cloud", "seven", "green", "quiet", "table", "north", "light", "paper", "storm")


def text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Room for a 30,000-token prompt."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-long"), arch="llama", seed=3,
                            max_position_embeddings=40000)


def engine_for(model: Path, tmp_path: Path, **server: Any) -> Engine:
    e = Engine(make_config(tmp_path, {"m": {"source": str(model)}}, **server))
    e.start()
    return e


@pytest.fixture
def chunked(tiny_llama: Path, tmp_path: Path) -> Iterator[Engine]:
    e = engine_for(tiny_llama, tmp_path, prefill_chunk=16, prefill_slice=0.01)
    yield e
    e.stop()


def tokens_of(model: Path, req: GenerateRequest) -> list[int]:
    """The prompt's tokens exactly as the engine's preparation stage makes them."""
    _, tokenizer = load(str(model))
    return prepare_request(req, tokenizer, 2048).tokens


def text_of(w: Waiter) -> str:
    return "".join(e.content for e in w.seen if isinstance(e, Delta))


# ---- same output as an unchunked prefill ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_chunked_greedy_equals_unchunked_with_and_without_a_prefix_hit(arch: str, request: pytest.FixtureRequest,
                                                                      tmp_path: Path) -> None:
    model: Path = request.getfixturevalue(arch)
    first_prompt, follow_up = text(120, seed=1), text(120, seed=1) + " " + text(60, seed=2)
    e = engine_for(model, tmp_path, prefill_chunk=16, prefill_slice=0.01)
    try:
        first = submit(e, "m", first_prompt, sampling=GREEDY, max_tokens=12)
        first_end = first.wait()
        second = submit(e, "m", follow_up, sampling=GREEDY, max_tokens=12)
        second_end = second.wait()
        chunks = e.status().counters.prefill_chunks
    finally:
        e.stop()
    assert isinstance(first_end, Done) and isinstance(second_end, Done)
    first_tokens, second_tokens = tokens_of(model, first.request), tokens_of(model, second.request)
    assert len(first_tokens) > 6 * 16 and first_end.usage.cached_tokens == 0
    assert second_end.usage.cached_tokens > 6 * 16  # the follow-up resumed from the first prompt's KV...
    assert len(second_tokens) - second_end.usage.cached_tokens > 2 * 16  # ...and prefilled the rest in chunks
    assert chunks >= (len(first_tokens) + len(second_tokens) - second_end.usage.cached_tokens) // 16
    # The oracle: mlx_lm's own generate_step, which prefills each of these prompts in a single pass.
    _, tokenizer = load(str(model))
    want_first, want_second = reference_greedy(model, first_tokens, 12), reference_greedy(model, second_tokens, 12)
    assert text_of(first) == tokenizer.decode(want_first) and len(set(want_first)) > 3
    assert text_of(second) == tokenizer.decode(want_second) and want_second != want_first


# ---- scheduling -----------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admit(runner: GenerateWorker, clock: Clock, request_id: int, words: int,
          priority: Priority = Priority.MEDIUM) -> Waiter:
    req = GenerateRequest(model="m", prompt=text(words, seed=request_id), raw=True, sampling=GREEDY, max_tokens=4,
                          request_id=request_id, priority=priority)
    w = Waiter(req)
    runner.add(prepare_request(req, runner.tokenizer, runner.context_length), w)
    return w


def progress(runner: GenerateWorker) -> dict[int, int]:
    return {job.request_id: job.done for job in runner.prefill_jobs()}


def test_least_remaining_work_first_then_priority_then_ageing(tiny_llama: Path) -> None:
    clock = Clock()
    runner = GenerateWorker("m", *load(str(tiny_llama)), 2048, clock=clock)
    # A slice so short that each run is exactly one chunk of at most 16 tokens: what runs shows the order.
    prefiller = Prefiller(1e-9, max_chunk=16, aging=30.0, clock=clock)
    admit(runner, clock, 1, 300)
    admit(runner, clock, 2, 20)
    prefiller.run([runner])
    assert progress(runner) == {1: 0, 2: 16}  # the shorter prompt goes first
    while 2 in progress(runner):
        prefiller.run([runner])
    assert 2 in runner.by_request and progress(runner) == {1: 0}  # and has joined the batch

    admit(runner, clock, 3, 20, priority=Priority.LOW)
    prefiller.run([runner])
    assert progress(runner) == {1: 16, 3: 0}  # priority before remaining work

    # Ageing: the long prompt is credited with what the model could have prefilled while it waited, so once it
    # has waited about as long as its own prefill takes, it overtakes a newer, shorter prompt.
    clock.now += 10
    admit(runner, clock, 4, 20)
    remaining = next(j.remaining for j in runner.prefill_jobs() if j.request_id == 1)
    prefiller.rate("m").tokens_per_second = remaining / 5  # 10 s of waiting = twice its remaining work
    prefiller.run([runner])
    assert progress(runner) == {1: 32, 3: 0, 4: 0}
    prefiller.rate("m").tokens_per_second = remaining / 50  # 10 s of waiting = a fifth of it: not yet
    prefiller.run([runner])
    assert progress(runner) == {1: 32, 3: 0, 4: 16}


# ---- a long prompt does not freeze the others -----------------------------------------------------------------

def test_a_stream_keeps_decoding_while_a_long_prompt_is_prefilled(long_model: Path, tmp_path: Path) -> None:
    def tokens_during_prefill(**server: Any) -> tuple[int, int]:
        home = tmp_path / str(server["prefill_slice"])
        home.mkdir()
        e = engine_for(long_model, home, **server)
        try:
            stream = submit(e, "m", "one two three", sampling=GREEDY, max_tokens=100000)
            stream.first_delta()
            long = submit(e, "m", text(800), sampling=GREEDY, max_tokens=1)
            assert isinstance(long.events.get(timeout=60), Started)
            # Decode steps of the stream, as the Deltas it received (one per step; a Delta that bundles tokens held
            # back as partial UTF-8 still counts one): three steps surround a whole prefill, the join's two among them.
            before = stream.events.qsize()
            long.first_delta()
            during = stream.events.qsize() - before
            e.cancel(stream.request.request_id)
            stream.wait()
            long.wait()
            return during, e.status().counters.prefill_slices
        finally:
            e.stop()

    chunked, slices = tokens_during_prefill(prefill_chunk=32, prefill_slice=0.01)
    whole, _ = tokens_during_prefill(prefill_chunk=2048, prefill_slice=0)
    assert slices >= 20  # 2,700 tokens at most 32 a chunk: many slices
    assert whole <= 3  # unchunked (as mlx_lm), the stream stands still for the whole prefill
    assert chunked >= slices // 2  # chunked, a decode step runs between (nearly) every two slices


def test_a_short_request_overtakes_a_long_prefill(long_model: Path, tmp_path: Path) -> None:
    e = engine_for(long_model, tmp_path, prefill_chunk=32, prefill_slice=0.01)
    try:
        long = submit(e, "m", text(1000), sampling=GREEDY, max_tokens=2)
        assert until(lambda: any(p.prefilled > 0 for p in e.status().prefill), timeout=60)
        short = submit(e, "m", "hello there", sampling=GREEDY, max_tokens=2)
        short_end = short.wait()
        remaining = e.status().prefill_queue_tokens
        long_end = long.wait()
    finally:
        e.stop()
    assert isinstance(short_end, Done) and isinstance(long_end, Done)
    assert short.ended_at < long.ended_at and remaining > 0  # the long prompt was still prefilling


# ---- leaving early --------------------------------------------------------------------------------------------

def test_cancel_stops_a_long_prefill_within_one_slice(long_model: Path, tmp_path: Path) -> None:
    e = engine_for(long_model, tmp_path, prefill_chunk=64, prefill_slice=0.02)
    try:
        w = submit(e, "m", text(9000), sampling=GREEDY, max_tokens=1)
        assert until(lambda: e.status().counters.prefill_slices >= 3, timeout=120)
        assert e.status().prefill[0].total > 25000
        at_cancel = e.status().counters.prefill_slices
        e.cancel(w.request.request_id)
        end = w.wait(timeout=10)
        after = e.status().counters
        time.sleep(0.2)
        assert e.status().counters.prefill_tokens == after.prefill_tokens  # nothing runs for it any more
        assert not e.status().prefill
    finally:
        e.stop()
    assert isinstance(end, Done) and end.reason == "cancelled"
    # At most one slice ran after the cancel; the snapshot read before it may lag the thread by one more.
    assert after.prefill_slices - at_cancel <= 2 and after.prefill_tokens < 25000


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_a_timeout_fires_between_prefill_chunks(long_model: Path, tmp_path: Path) -> None:
    e = engine_for(long_model, tmp_path, prefill_chunk=64, prefill_slice=0.02)
    try:
        w = submit(e, "m", text(9000), sampling=GREEDY, max_tokens=1, timeout=1.5)
        end = w.wait(timeout=60)
        late = w.ended_at - w.request.created - 1.5
        prefilled = e.status().counters.prefill_tokens
    finally:
        e.stop()
    assert isinstance(end, Failed) and isinstance(end.error, RequestTimeout)
    assert 0 < prefilled < 25000 and late < 1.0


def test_a_prefill_that_raises_fails_only_its_request(tiny_llama: Path, tmp_path: Path) -> None:
    e = engine_for(tiny_llama, tmp_path, prefill_chunk=16, prefill_slice=0.01)
    try:
        stream = submit(e, "m", "one two", sampling=GREEDY, max_tokens=100000)
        stream.first_delta()
        runner = e.core.pool.get("m").model.workers["generate"]  # type: ignore[union-attr]
        real = runner.prefill

        def broken(job: Any, n: int) -> None:
            if job.request_id != stream.request.request_id:
                raise RuntimeError("injected: prefill failed")
            real(job, n)

        runner.prefill = broken  # fault injection for the next prompt's prefill
        bad = submit(e, "m", text(100), sampling=GREEDY, max_tokens=4)
        end = bad.wait()
        runner.prefill = real
        assert isinstance(end, Failed) and "injected" in end.error.message
        ok = submit(e, "m", text(50), sampling=GREEDY, max_tokens=3)
        assert isinstance(ok.wait(), Done)
        assert isinstance(stream.events.get(timeout=5), Delta)  # the running stream never noticed
        e.cancel(stream.request.request_id)
        stream.wait()
    finally:
        e.stop()


def test_a_sequence_cancelled_right_after_joining_never_holds_up_another_models_prefill(
        tiny_llama: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    """The first token of a sequence that just joined comes before more prefill; once that sequence is gone (a client
    that hung up), its model's runner goes idle and must not keep every other model's prompts waiting."""
    e = Engine(make_config(tmp_path, {"a": {"source": str(tiny_llama)}, "b": {"source": str(tiny_qwen2)}},
                           prefill_chunk=16, prefill_slice=0.01))
    e.start()
    try:
        prompt = text(20, seed=5)
        assert isinstance(submit(e, "a", prompt, sampling=GREEDY, max_tokens=1).wait(), Done)  # its KV is now cached
        hit = GenerateRequest(model="a", prompt=prompt, raw=True, sampling=GREEDY, max_tokens=50)

        def cancel_on_join(req: Any, event: Any) -> None:
            # Runs on the inference thread: a cache hit joins the batch inside admission, before Started goes out,
            # so the Cancel lands between the join and the sequence's first token.
            if req.request_id == hit.request_id and isinstance(event, Started):
                e.cancel(req.request_id)

        e.observe(cancel_on_join)
        joined = Waiter(hit)
        e.submit(hit, joined)
        assert isinstance(joined.wait(), Done) and joined.seen[0].cached_tokens > 0  # type: ignore[union-attr]
        other = submit(e, "b", text(200, seed=6), sampling=GREEDY, max_tokens=2, timeout=10)
        end = other.wait(timeout=20)
    finally:
        e.stop()
    assert isinstance(end, Done), end
