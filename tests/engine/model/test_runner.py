"""GenerateWorker on real tiny models: greedy equals mlx_lm, stops, limits, seeds, cancellation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlx_lm import generate as mlx_generate
from mlx_lm import load

from support.enginetools import add, prefill_all
from mlx_server.engine.prepare.stage import prepare_request
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.contract.events import Delta, Done, Event, Started
from mlx_server.contract.requests import ChatMessage, GenerateRequest, SamplingParams
from support.tinymodels import reference_greedy

GREEDY = SamplingParams(temperature=0.0)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.content for e in self.events if isinstance(e, Delta))

    @property
    def done(self) -> Done:
        [done] = [e for e in self.events if isinstance(e, Done)]
        return done


def run(runner: GenerateWorker, *reqs: GenerateRequest, max_steps: int = 500) -> list[Recorder]:
    recs = [Recorder() for _ in reqs]
    for req, rec in zip(reqs, recs):
        add(runner, req, rec)
    for _ in range(max_steps):
        if not runner.has_work():
            break
        runner.step()
    assert not runner.has_work()
    return recs


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def loaded(request: pytest.FixtureRequest) -> tuple[Path, Any, Any]:
    path = request.getfixturevalue(request.param)
    model, tokenizer = load(str(path))
    return path, model, tokenizer


def make_runner(loaded: tuple[Path, Any, Any], ctx: int = 2048) -> GenerateWorker:
    _, model, tokenizer = loaded
    return GenerateWorker("tiny", model, tokenizer, ctx, max_batch=8)


def test_greedy_chat_equals_mlx_lm(loaded: tuple[Path, Any, Any]) -> None:
    path, model, tokenizer = loaded
    messages = [{"role": "user", "content": "Tell me about the river and the mountain."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens = list(tokenizer.encode(prompt, add_special_tokens=False))
    want = reference_greedy(path, tokens, 24)
    [rec] = run(make_runner(loaded), GenerateRequest(
        model="tiny", messages=[ChatMessage("user", messages[0]["content"])], sampling=GREEDY, max_tokens=24))
    assert rec.text == tokenizer.decode(want)
    assert rec.done.usage.completion_tokens == len(want) == 24
    assert len(set(want)) > 5  # the tiny model's output is varied, so equality means something
    started = rec.events[0]
    assert isinstance(started, Started) and started.prompt_tokens == len(tokens)


def test_raw_prompt_equals_mlx_lm_generate(loaded: tuple[Path, Any, Any]) -> None:
    _, model, tokenizer = loaded
    prompt = "The quick brown fox jumps over"
    want = mlx_generate(model, tokenizer, prompt, max_tokens=16)
    [rec] = run(make_runner(loaded), GenerateRequest(model="tiny", prompt=prompt, raw=True, sampling=GREEDY,
                                                     max_tokens=16))
    assert rec.text == want
    assert rec.done.reason == "length"


def test_stop_string_split_across_tokens_is_never_emitted(loaded: tuple[Path, Any, Any]) -> None:
    path, _, tokenizer = loaded
    req = GenerateRequest(model="tiny", prompt="Numbers 123 and words", raw=True, sampling=GREEDY, max_tokens=30)
    full = tokenizer.decode(reference_greedy(path, list(tokenizer.encode(req.prompt)), 30))
    # A stop string that straddles a token boundary: the last 2 chars of one token + first of the next.
    pieces = [tokenizer.decode([t]) for t in reference_greedy(path, list(tokenizer.encode(req.prompt)), 30)]
    idx = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[idx][-2:] + pieces[idx + 1][:1]
    cut = full.find(stop)
    assert cut >= 0
    req.stop = (stop,)
    [rec] = run(make_runner(loaded), req)
    assert rec.text == full[:cut]
    assert stop not in rec.text
    assert rec.done.reason == "stop"


def test_num_predict_and_context_limit(loaded: tuple[Path, Any, Any]) -> None:
    [rec] = run(make_runner(loaded), GenerateRequest(model="tiny", prompt="hello", raw=True, sampling=GREEDY,
                                                     max_tokens=5))
    assert rec.done.usage.completion_tokens == 5 and rec.done.reason == "length"
    # num_ctx bounds prompt + generation together
    [rec] = run(make_runner(loaded), GenerateRequest(model="tiny", prompt="hello there", raw=True,
                                                     sampling=GREEDY, num_ctx=12))
    started = rec.events[0]
    assert isinstance(started, Started)
    assert started.prompt_tokens + rec.done.usage.completion_tokens == 12


def test_long_prompt_truncated_from_the_left(loaded: tuple[Path, Any, Any]) -> None:
    _, _, tokenizer = loaded
    prompt = " ".join(f"word{i}" for i in range(200))
    n = len(tokenizer.encode(prompt))
    [rec] = run(make_runner(loaded), GenerateRequest(model="tiny", prompt=prompt, raw=True, sampling=GREEDY,
                                                     num_ctx=64, max_tokens=8))
    started = rec.events[0]
    assert isinstance(started, Started)
    assert started.truncated == n - started.prompt_tokens > 0
    assert started.prompt_tokens + 8 <= 64
    assert rec.done.usage.completion_tokens == 8


def test_seed_reproducible_and_seeds_differ(loaded: tuple[Path, Any, Any]) -> None:
    def sample(seed: int) -> str:
        sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        [rec] = run(make_runner(loaded), GenerateRequest(model="tiny", prompt="Once upon", raw=True, sampling=sp,
                                                         max_tokens=20))
        return rec.text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_seeded_sample_unchanged_by_batch_company(loaded: tuple[Path, Any, Any]) -> None:
    sp = SamplingParams(temperature=0.9, seed=42)
    alone = run(make_runner(loaded), GenerateRequest(model="tiny", prompt="Once upon", raw=True, sampling=sp,
                                                     max_tokens=16))[0].text
    together = run(make_runner(loaded),
                   GenerateRequest(model="tiny", prompt="Once upon", raw=True, sampling=sp, max_tokens=16),
                   GenerateRequest(model="tiny", prompt="Other text here", raw=True,
                                   sampling=SamplingParams(temperature=1.0, seed=3), max_tokens=16))[0].text
    assert alone == together


def test_cancel_drops_the_sequence_before_the_next_step(loaded: tuple[Path, Any, Any]) -> None:
    runner = make_runner(loaded)
    keep, drop = Recorder(), Recorder()
    add(runner, GenerateRequest(model="tiny", prompt="a b c", raw=True, sampling=GREEDY, max_tokens=50,
                               request_id=1001), keep)
    add(runner, GenerateRequest(model="tiny", prompt="d e f", raw=True, sampling=GREEDY, max_tokens=50,
                               request_id=1002), drop)
    for _ in range(4):
        runner.step()
    assert runner.cancel(1002)
    emitted = len(drop.events)
    assert drop.events[-1] == Done(1002, "tiny", "cancelled", drop.done.usage)
    runner.step()
    assert len(drop.events) == emitted  # nothing more for the cancelled sequence
    assert set(runner.generator._find_uids(range(10))) == {runner.by_request[1001]}
    while runner.has_work():
        runner.step()
    assert keep.done.usage.completion_tokens == 50


def _shifted_oracle(path: Path, prompt: list[int], ctx: int, keep: int, limit: int, eos: set[int]) -> list[int]:
    """Ollama's context shift, step by step with mlx_lm as the model: generate until the window is full, drop the
    older half of what follows the first `keep` tokens, go on from what is left."""
    history, made = list(prompt), []
    while len(made) < limit:
        room = min(ctx - len(history), limit - len(made))
        piece = reference_greedy(path, history, room, stop_at_eos=False)
        cut = next((i for i, t in enumerate(piece) if t in eos), None)
        made += piece if cut is None else piece[:cut]
        if cut is not None:
            break
        history += piece
        history = history[:keep] + history[keep + (ctx - keep) // 2 :]
    return made


def _run_shifting(runner: GenerateWorker, req: GenerateRequest) -> Recorder:
    rec = Recorder()
    add(runner, req, rec)
    for _ in range(1000):
        if not runner.has_work():
            break
        runner.step()
        prefill_all(runner)  # a shifted sequence prefills its kept tail again before it rejoins the batch
    assert not runner.has_work()
    return rec


def test_context_shift_goes_on_as_ollamas_does(loaded: tuple[Path, Any, Any]) -> None:
    path, _, tokenizer = loaded
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = list(tokenizer.encode(prompt))
    ctx, limit = len(ids) + 10, 40  # three shifts before the limit
    want = _shifted_oracle(path, ids, ctx, 3, limit, set(tokenizer.eos_token_ids))
    req = GenerateRequest(model="tiny", prompt=prompt, raw=True, sampling=GREEDY, num_ctx=ctx, max_tokens=limit,
                          shift=True, num_keep=3)
    rec = _run_shifting(make_runner(loaded), req)
    assert len(want) > ctx - len(ids)  # the oracle itself went past the window
    assert rec.text == tokenizer.decode(want)
    assert rec.done.usage.completion_tokens == len(want)
    assert rec.done.reason == ("length" if len(want) == limit else "stop")
    assert not rec.done.window  # num_predict ended it, not the window
    unshifted = _run_shifting(make_runner(loaded), replace(req, shift=False))
    assert unshifted.done.usage.completion_tokens == ctx - len(ids) and unshifted.done.window


def test_a_chat_shift_keeps_the_system_prompt(loaded: tuple[Path, Any, Any]) -> None:
    _, _, tokenizer = loaded
    system = "You are a careful assistant who answers in full sentences about rivers."
    req = GenerateRequest(model="tiny", messages=[ChatMessage("system", system), ChatMessage("user", "Go on.")],
                          sampling=GREEDY, shift=True)
    prepared = prepare_request(req, tokenizer, 2048)
    head = tokenizer.decode(prepared.tokens[: prepared.keep])
    assert system in head and "Go on" not in head
    assert prepare_request(replace(req, num_keep=-1), tokenizer, 2048).keep == len(prepared.tokens) - 1
    assert prepare_request(replace(req, shift=False), tokenizer, 2048).keep == 0


def test_a_named_session_keeps_one_stored_prompt(loaded: tuple[Path, Any, Any]) -> None:
    first = [ChatMessage("system", "Answer briefly."), ChatMessage("user", "Name a river.")]
    later = [*first, ChatMessage("assistant", "The Rhine, I think."), ChatMessage("user", "And a mountain?")]

    def turns(key: str | None) -> tuple[GenerateWorker, Recorder]:
        runner = make_runner(loaded)
        run(runner, GenerateRequest(model="tiny", messages=first, sampling=GREEDY, max_tokens=6, cache_key=key))
        [rec] = run(runner, GenerateRequest(model="tiny", messages=later, sampling=GREEDY, max_tokens=6,
                                            cache_key=key))
        return runner, rec

    unnamed, _ = turns(None)
    named, second = turns("session-1")
    assert unnamed.prompt_cache.entries() == 2  # the first turn's answer was not what the second re-rendered
    assert named.prompt_cache.entries() == 1
    started = second.events[0]
    assert isinstance(started, Started) and started.cached_tokens > 0  # the second turn reused the first's prefix


def test_the_first_token_comes_with_the_prefill(loaded: tuple[Path, Any, Any]) -> None:
    """Not two batch steps later (the batch pipelines its sampling): a one-token reply never joins the batch."""
    path, _, tokenizer = loaded
    prompt = "The quick brown fox jumps over"
    runner = make_runner(loaded)
    one = Recorder()
    add(runner, GenerateRequest(model="tiny", prompt=prompt, raw=True, sampling=GREEDY, max_tokens=1), one)
    assert not runner.has_work() and one.done.reason == "length" and one.done.usage.completion_tokens == 1
    assert isinstance(one.events[0], Started)
    want = reference_greedy(path, list(tokenizer.encode(prompt)), 6)
    assert one.text == tokenizer.decode(want[:1])
    more = Recorder()
    add(runner, GenerateRequest(model="tiny", prompt=prompt, raw=True, sampling=GREEDY, max_tokens=6), more)
    assert isinstance(more.events[0], Started) and isinstance(more.events[1], Delta)  # before any step
    for _ in range(50):
        if not runner.has_work():
            break
        runner.step()
    assert more.text == tokenizer.decode(want) and more.done.usage.completion_tokens == 6
