"""Speculative decoding (models.yaml `draft`) on the real engine: greedy output is token for token the undrafted
output for concurrent requests mixing drafted, undrafted, grammar-constrained and stop-string requests, with a
draft model and with prompt lookup; an identical draft accepts everything; the prompt cache and a quantized KV
cache work with drafting on; status names the draft; a draft with another vocabulary is refused at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from mlx_server.contract.events import Delta, Done, Failed, Started
from mlx_server.contract.requests import GenerateRequest, SamplingParams
from mlx_server.engine.engine import Engine
from support.enginetools import Waiter
from support.serving import make_config
from support.tinymodels import build_tiny_model, perturbed_copy

GREEDY = SamplingParams(temperature=0.0)
PENALIZED = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=16)
QUOTED = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a"


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("spec64"), arch="llama", hidden_size=256, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def engine(tiny_llama: Path, tiny64: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    helper = perturbed_copy(tiny_llama, tmp_path_factory.mktemp("helper"), scale=0.02)  # agrees now and then
    other_vocab = build_tiny_model(tmp_path_factory.mktemp("other"), arch="llama", template="llama3")
    models: dict[str, Any] = {
        "plain": {"source": str(tiny_llama)},
        "lookup": {"source": str(tiny_llama), "draft": "prompt-lookup"},
        "drafted": {"source": str(tiny_llama), "draft": "helper", "num_draft": 3},
        "helper": {"source": str(helper)},
        "twin-drafted": {"source": str(tiny_llama), "draft": "twin"},
        "twin": {"source": str(tiny_llama)},
        "mismatch": {"source": str(tiny_llama), "draft": "other-vocab"},
        "other-vocab": {"source": str(other_vocab)},
        "plain-q8": {"source": str(tiny64), "kv_cache": "q8"},
        "lookup-q8": {"source": str(tiny64), "kv_cache": "q8", "draft": "prompt-lookup"},
    }
    e = Engine(make_config(tmp_path_factory.mktemp("cfg"), models, max_loaded_models=4))
    e.start()
    yield e
    e.stop()


def request(model: str, prompt: str, **kw: Any) -> GenerateRequest:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("max_tokens", 24)
    return GenerateRequest(model=model, prompt=prompt, raw=True, **kw)


def run(engine: Engine, req: GenerateRequest) -> Waiter:
    w = Waiter(req)
    engine.submit(req, w)
    return w


def finish(w: Waiter) -> tuple[str, str, Done]:
    end = w.wait(120)
    assert isinstance(end, Done), end
    return "".join(e.content for e in w.seen if isinstance(e, Delta)), end.reason, end


def mixed(model: str) -> list[GenerateRequest]:
    """Eight requests: drafted, undrafted (draft_num_predict 0), grammar-constrained, stop strings, penalties."""
    return [
        request(model, QUOTED),
        request(model, "one two three one two three one two", sampling=PENALIZED),
        request(model, QUOTED, num_draft=0),
        request(model, "hello world", num_draft=0, sampling=PENALIZED),
        request(model, "Answer in JSON: ", format="json", max_tokens=20),
        request(model, QUOTED, format={"type": "object", "properties": {"a": {"type": "integer"}}}, max_tokens=20),
        request(model, QUOTED, stop=("a", "(")),
        request(model, "a b c d a b c d a b", stop=("d",), num_draft=2, max_tokens=40),
    ]


def undrafted(engine: Engine, reqs: list[GenerateRequest], model: str) -> list[tuple[str, str]]:
    out = []
    for r in reqs:
        text, reason, _ = finish(run(engine, request(model, r.prompt or "", **_same(r))))
        out.append((text, reason))
    return out


def _same(r: GenerateRequest) -> dict[str, Any]:
    return {"sampling": r.sampling, "max_tokens": r.max_tokens, "format": r.format, "stop": r.stop}


@pytest.mark.parametrize(("model", "baseline"), [("lookup", "plain"), ("drafted", "plain"), ("lookup-q8", "plain-q8")])
def test_greedy_output_is_the_undrafted_output(engine: Engine, model: str, baseline: str) -> None:
    reqs = mixed(model)
    expected = undrafted(engine, reqs, baseline)
    waiters = [run(engine, r) for r in reqs]  # all eight at once, in one batch
    got = [finish(w) for w in waiters]
    assert [(text, reason) for text, reason, _ in got] == expected
    drafted = [end.usage.draft_tokens for _, _, end in got]
    assert drafted[2] == drafted[3] == 0  # draft_num_predict 0: these rows stepped undrafted
    if model == "drafted":
        assert all(d > 0 for i, d in enumerate(drafted) if i not in (2, 3))  # a draft model always proposes
        accepted = [end.usage.draft_accepted for _, _, end in got]
        # rows kept different numbers of drafts in the same passes, so their KV was trimmed by different amounts
        assert 0 < sum(accepted) < sum(drafted) and len({a for a in accepted if a}) > 1


def test_an_identical_draft_accepts_everything(engine: Engine) -> None:
    text, _, end = finish(run(engine, request("twin-drafted", QUOTED, max_tokens=30)))
    alone, _, _ = finish(run(engine, request("plain", QUOTED, max_tokens=30)))
    assert text == alone
    assert end.usage.draft_tokens > 0
    assert end.usage.draft_accepted == end.usage.draft_tokens
    # 1 + 4 tokens per target pass: 30 tokens took far fewer steps than tokens (one per pass undrafted)
    assert end.usage.completion_tokens == 30


def test_the_prompt_cache_serves_drafted_sequences(engine: Engine) -> None:
    first, _, _ = finish(run(engine, request("drafted", QUOTED + " + b", max_tokens=12)))
    again = run(engine, request("drafted", QUOTED + " + b", max_tokens=12))
    text, _, _ = finish(again)
    started = next(e for e in again.seen if isinstance(e, Started))
    assert started.cached_tokens > 0  # target and draft KV came back from the cache together
    assert text == first


def test_status_names_the_draft(engine: Engine) -> None:
    finish(run(engine, request("drafted", "hi", max_tokens=2)))
    finish(run(engine, request("lookup", "hi", max_tokens=2)))
    drafts = {m.name: m.draft for m in engine.status().models}
    assert drafts["drafted"] == "helper" and drafts["lookup"] == "prompt-lookup"
    by_name = {m.name: m for m in engine.status().models}
    # the draft's KV is part of every drafted sequence's: twice the bytes per token of the same target alone
    assert by_name["drafted"].kv_bytes_per_token == 2 * by_name["lookup"].kv_bytes_per_token


def test_a_draft_with_another_vocabulary_is_refused(engine: Engine) -> None:
    end = run(engine, request("mismatch", "hello")).wait(120)
    assert isinstance(end, Failed)
    assert '"mismatch"' in end.error.message and '"other-vocab"' in end.error.message
    assert "vocabularies differ" in end.error.message


def test_logprobs_are_the_undrafted_ones(engine: Engine) -> None:
    def logprobs(model: str) -> list[tuple[str, float]]:
        w = run(engine, request(model, QUOTED + " # sum", max_tokens=16, logprobs=True, top_logprobs=2))
        finish(w)
        return [(lp.token, lp.logprob) for e in w.seen if isinstance(e, Delta) for lp in e.logprobs]

    plain, drafted = logprobs("plain"), logprobs("drafted")
    assert [t for t, _ in drafted] == [t for t, _ in plain] and len(plain) == 16
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(drafted, plain, strict=True))


def test_a_drafted_request_that_leaves_early_disturbs_no_other(engine: Engine) -> None:
    expected, _, _ = finish(run(engine, request("plain", QUOTED + "  ", max_tokens=30)))
    gone = run(engine, request("drafted", "one two three one two", max_tokens=200))
    stays = run(engine, request("drafted", QUOTED + "  ", max_tokens=30))
    gone.first_delta()
    engine.cancel(gone.request.request_id)
    end = gone.wait(60)
    assert isinstance(end, Done) and end.reason == "cancelled"
    text, _, _ = finish(stays)
    assert text == expected
