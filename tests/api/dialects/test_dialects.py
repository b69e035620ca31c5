"""The three dialects over a FakeEngine: what the engine receives for each request, and what the client gets back.

A real uvicorn server runs the real app; only the engine is fake (tests/support/fakeengine.py), so each case takes
milliseconds. What the real engine does with these requests is tested end to end in test_ollama.py,
test_openai.py and test_anthropic.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from mlx_server.contract.errors import ServerBusy
from mlx_server.contract.events import Delta, Done, Event, Failed, Started, Usage
from mlx_server.contract.requests import (
    CountTokensRequest,
    EmbedRequest,
    EngineRequest,
    GenerateRequest,
    LoadRequest,
    UnloadRequest,
)
from support.fakeengine import FakeEngine, fake_model
from support.serving import Server, make_config, serve

HI = [{"role": "user", "content": "one two three four five six seven"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CONFIGURED = {"temperature": 0.2, "top_k": 7, "num_predict": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("dialects")
    tooly = fake_model(tmp / "tooly", "{% if tools %}{{ tools }}{% endif %}{{ messages }}")
    plain = fake_model(tmp / "plain", "{{ messages }}")
    config = make_config(tmp, {"configured": {"source": str(tooly), "options": CONFIGURED},
                               "tooly": {"source": str(tooly)}, "plain": {"source": str(plain)},
                               "quiet": {"source": str(plain)}})
    with serve(config, engine=FakeEngine()) as s:
        yield s


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=10)


def generation(engine: FakeEngine) -> GenerateRequest:
    req = engine.last
    assert isinstance(req, GenerateRequest), req
    return req


# ---- one sampling precedence in every dialect -----------------------------------------------------------------

REQUESTS = {  # dialect → (path, body without sampling fields, how the request sets temperature)
    "ollama": ("/api/chat", {"messages": HI, "stream": False}, lambda t: {"options": {"temperature": t}}),
    "openai": ("/v1/chat/completions", {"messages": HI}, lambda t: {"temperature": t}),
    "anthropic": ("/v1/messages", {"messages": HI, "max_tokens": 5}, lambda t: {"temperature": t}),
}
DEFAULTS = {"ollama": (0.8, 0.9, 40, 1.1), "openai": (1.0, 1.0, 0, 1.0), "anthropic": (1.0, 1.0, 0, 1.0)}


@pytest.mark.parametrize("dialect", sorted(REQUESTS))
def test_sampling_request_over_model_options_over_dialect_defaults(server: Server, engine: FakeEngine,
                                                                    dialect: str) -> None:
    path, body, temperature = REQUESTS[dialect]
    temp, top_p, top_k, repeat = DEFAULTS[dialect]
    assert post(server, path, {**body, "model": "plain"}).status_code == 200
    s = generation(engine).sampling
    assert (s.temperature, s.top_p, s.top_k, s.repeat_penalty) == (temp, top_p, top_k, repeat)
    # models.yaml options fill what the request leaves out, whatever the dialect (a Claude Code user gets 0.2)
    assert post(server, path, {**body, "model": "configured"}).status_code == 200
    s = generation(engine).sampling
    assert (s.temperature, s.top_k, s.top_p) == (0.2, 7, top_p)
    # an explicit field wins, even a falsy one
    assert post(server, path, {**body, "model": "configured", **temperature(0)}).status_code == 200
    assert generation(engine).sampling.temperature == 0.0


@pytest.mark.parametrize("path,body,expected", [
    ("/v1/chat/completions", {"model": "configured", "messages": HI}, 5),  # models.yaml num_predict
    ("/v1/chat/completions", {"model": "configured", "messages": HI, "max_tokens": 3}, 3),
    ("/v1/chat/completions", {"model": "plain", "messages": HI}, None),  # until the context is full
    ("/v1/completions", {"model": "plain", "prompt": "a b"}, 16),  # OpenAI's documented default
    ("/v1/completions", {"model": "configured", "prompt": "a b"}, 5),
    ("/api/generate", {"model": "configured", "prompt": "a b", "stream": False}, 5),
    ("/api/generate", {"model": "configured", "prompt": "a b", "stream": False, "options": {"num_predict": 2}}, 2),
])
def test_max_tokens_precedence(server: Server, engine: FakeEngine, path: str, body: dict[str, Any],
                               expected: int) -> None:
    assert post(server, path, body).status_code == 200
    assert generation(engine).max_tokens == expected


# ---- engine requests of every kind --------------------------------------------------------------------------


def test_empty_ollama_requests_load_and_unload(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/generate", {"model": "plain", "keep_alive": "1h"})
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    assert isinstance(engine.last, LoadRequest) and engine.last.keep_alive == 3600
    r = post(server, "/api/chat", {"model": "plain", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["message"] == {"role": "assistant", "content": ""}
    assert isinstance(engine.last, UnloadRequest) and engine.last.model == "plain"
    assert len(engine.requests) == 2


def test_count_tokens_sends_a_count_request(server: Server, engine: FakeEngine) -> None:
    engine.prompt_tokens = 42
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    assert client.messages.count_tokens(model="tooly", messages=HI, system="be brief").input_tokens == 42
    req = engine.last
    assert isinstance(req, CountTokensRequest) and req.model == "tooly"
    assert [m.role for m in req.request.messages or []] == ["system", "user"]


def test_created_is_the_arrival_not_the_end_of_parsing(server: Server, engine: FakeEngine) -> None:
    sent: list[float] = []

    def slow_body() -> Iterator[bytes]:
        yield b'{"model": "plain", "stream": false, '
        sent.append(time.monotonic())
        time.sleep(0.6)
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    r = httpx.post(f"{server.url}/api/chat", content=slow_body(), timeout=10)
    assert r.status_code == 200
    assert generation(engine).created < sent[0] + 0.3  # before the body had finished arriving


# ---- Ollama fidelity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_eval_count_includes_cached_tokens(server: Server, engine: FakeEngine, stream: bool) -> None:
    engine.prompt_tokens, engine.cached_tokens = 30, 25
    parts = ollama.Client(host=server.url).chat(model="plain", messages=HI, stream=stream)
    final = list(parts)[-1] if stream else parts
    assert final.prompt_eval_count == 30 and final.eval_count == 7


@pytest.mark.parametrize("body,streams", [
    ({"prompt": "a b", "max_tokens": 3}, False),  # the old MLX-server shape: one JSON object
    ({"category": "plain", "prompt": "a b"}, False),
    ({"model": "plain", "prompt": "a b", "max_tokens": 3, "stream": True}, True),
    ({"model": "plain", "prompt": "a b"}, True),  # Ollama's default
])
def test_mlx_style_requests_default_to_one_object(tmp_path: Path, body: dict[str, Any], streams: bool) -> None:
    plain = fake_model(tmp_path / "plain", "{{ messages }}")
    config = make_config(tmp_path, {"plain": {"source": str(plain)}}, default_model="plain")
    with serve(config, engine=FakeEngine()) as s:
        r = post(s, "/api/generate", body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson" if streams else "application/json")
    lines = r.text.strip().splitlines()
    assert (len(lines) > 1) == streams and json.loads(lines[-1])["done"] is True


# ---- embeddings and tools: what a model can do ----------------------------------------------------------------


def test_generating_models_embed_too(server: Server, engine: FakeEngine) -> None:
    # Ollama's behaviour (the routes themselves are tested in test_embeddings.py)
    assert post(server, "/api/embed", {"model": "plain", "input": "x"}).status_code == 200
    assert post(server, "/api/embeddings", {"model": "plain", "prompt": "x"}).status_code == 200
    openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").embeddings.create(model="plain", input="x")
    assert [(type(r), r.model) for r in engine.requests] == [(EmbedRequest, "plain")] * 3
    assert post(server, "/api/embed", {"model": "nope", "input": "x"}).status_code == 404


TOOL_REQUESTS = {
    "ollama": ("/api/chat", {"messages": HI, "stream": False, "tools": [TOOL]}),
    "openai": ("/v1/chat/completions", {"messages": HI, "tools": [TOOL]}),
    "anthropic": ("/v1/messages", {"messages": HI, "max_tokens": 5,
                                   "tools": [{"name": "f", "input_schema": {"type": "object"}}]}),
}


@pytest.mark.parametrize("dialect", sorted(TOOL_REQUESTS))
def test_tools_for_a_model_without_a_tool_format_are_accepted_and_flagged(
        server: Server, engine: FakeEngine, dialect: str, caplog: pytest.LogCaptureFixture) -> None:
    path, body = TOOL_REQUESTS[dialect]
    before = ignored(server, "plain")
    r = post(server, path, {**body, "model": "plain"})
    assert r.status_code == 200 and r.headers["x-mlx-tools-ignored"] == "model has no tool-call format"
    assert generation(engine).tools  # still handed on
    assert ignored(server, "plain") == before + 1
    r = post(server, path, {**body, "model": "tooly"})
    assert r.status_code == 200 and "x-mlx-tools-ignored" not in r.headers


def ignored(server: Server, model: str) -> float:
    wanted = f'mlx_tools_ignored_total{{model="{model}"}}'
    lines = [ln for ln in httpx.get(f"{server.url}/metrics").text.splitlines() if ln.startswith(wanted)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_ignored_tools_are_logged_once_per_model(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    path, body = TOOL_REQUESTS["openai"]
    with caplog.at_level(logging.WARNING, logger="mlx_server.api"):
        for _ in range(3):  # Open WebUI attaches its tools to every chat
            assert post(server, path, {**body, "model": "quiet"}).status_code == 200
    notes = [r for r in caplog.records if "no tool-call format" in r.getMessage() and "quiet" in r.getMessage()]
    assert len(notes) == 1 and ignored(server, "quiet") == 3


def test_forced_tool_choice_is_not_flagged(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/v1/chat/completions", {"model": "plain", "messages": HI, "tools": [TOOL],
                                              "tool_choice": "required"})
    assert r.status_code == 200 and "x-mlx-tools-ignored" not in r.headers
    assert generation(engine).force_tool is not None


# ---- answers and errors in each dialect's shape ------------------------------------------------------------------


def failing_mid_stream(req: EngineRequest) -> list[Event]:
    rid = req.request_id
    return [Started(rid, req.model, 3, 0, 0.0), Delta(rid, content="partial", tokens=1),
            Failed(rid, ServerBusy("the engine gave up"))]


def test_errors_after_the_start_end_each_stream_in_its_own_frame(server: Server, engine: FakeEngine) -> None:
    engine.script = failing_mid_stream
    with pytest.raises(ollama.ResponseError, match="the engine gave up"):
        list(ollama.Client(host=server.url).chat(model="plain", messages=HI, stream=True))
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="the engine gave up"):
        list(oa.chat.completions.create(model="plain", messages=HI, stream=True))  # type: ignore[arg-type]
    an = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="the engine gave up"):
        with an.messages.stream(model="plain", messages=HI, max_tokens=5) as stream:  # type: ignore[arg-type]
            list(stream)


LINE_BREAKING = "one\x85two\u2028three\u2029four"  # JSON leaves them raw; httpx's iter_lines splits at them


def line_breaking(req: EngineRequest) -> list[Event]:
    rid = req.request_id
    return [Started(rid, req.model, 3, 0, 0.0), Delta(rid, content=LINE_BREAKING, tokens=1),
            Done(rid, req.model, "stop", Usage(prompt_tokens=3, completion_tokens=1))]


def test_text_that_line_readers_split_on_streams_whole(server: Server, engine: FakeEngine) -> None:
    """A model may write NEL or U+2028: every streamed line stays one line for each official client."""
    engine.script = line_breaking
    parts = list(ollama.Client(host=server.url).chat(model="plain", messages=HI, stream=True))
    assert "".join(p.message.content or "" for p in parts) == LINE_BREAKING
    parts = list(ollama.Client(host=server.url).generate(model="plain", prompt="hi", stream=True))
    assert "".join(p.response for p in parts) == LINE_BREAKING
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    chunks = oa.chat.completions.create(model="plain", messages=HI, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == LINE_BREAKING
    an = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    with an.messages.stream(model="plain", messages=HI, max_tokens=5) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == LINE_BREAKING


@pytest.mark.parametrize("path,body,shape", [
    ("/api/chat", {"messages": HI}, lambda j: j["error"]),
    ("/v1/chat/completions", {"messages": HI},
     lambda j: j["error"]["type"] == "server_error" and j["error"]["message"]),
    ("/v1/messages", {"messages": HI, "max_tokens": 5},
     lambda j: j["type"] == "error" and j["error"]["type"] == "overloaded_error" and j["error"]["message"]),
])
def test_refusals_are_503_in_each_shape(server: Server, engine: FakeEngine, path: str, body: dict[str, Any],
                                        shape: Any) -> None:
    engine.refuse = ServerBusy("server busy, retry later")
    r = post(server, path, {**body, "model": "plain"})
    assert r.status_code == 503 and "server busy" in shape(r.json())


def test_sdk_round_trips(server: Server, engine: FakeEngine) -> None:
    engine.cached_tokens = 4
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    r = oa.chat.completions.create(model="tooly", messages=HI, max_tokens=3)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "one two three" and r.choices[0].finish_reason == "length"
    assert r.usage and r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens == 4
    streamed = oa.completions.create(model="tooly", prompt="a b", stream=True, echo=True)
    assert "".join(c.choices[0].text for c in streamed) == "a ba b"
    an = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    m = an.messages.create(model="tooly", messages=HI, max_tokens=50)  # type: ignore[arg-type]
    assert m.content[0].text == HI[0]["content"] and m.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens) == (8, 4)
    with an.messages.stream(model="tooly", messages=HI, max_tokens=2) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == "one two"
        assert stream.get_final_message().stop_reason == "max_tokens"


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", {"messages": HI, "temperature": 3}, 'invalid value for field "temperature"'),
    ("/v1/chat/completions", {"messages": HI, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": HI, "n": 2}, "n > 1"),
    ("/v1/chat/completions", {"messages": HI, "stop": 5}, "expected a string or an array of strings"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    ("/v1/messages", {"messages": HI}, "max_tokens: Field required"),
    ("/v1/messages", {"messages": HI, "max_tokens": 5, "top_k": True}, "top_k: Input should be a valid integer"),
    ("/api/chat", {"messages": HI, "options": {"temperature": "hot"}}, 'invalid option "temperature"'),
    ("/api/chat", {"messages": HI, "options": [1]}, '"options": expected an object'),
])
def test_bad_fields_are_400_naming_the_field(server: Server, engine: FakeEngine, path: str,
                                             body: dict[str, Any], needle: str) -> None:
    r = post(server, path, {**body, "model": "plain"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in (err if isinstance(err, str) else err["message"])
    assert engine.requests == []


@pytest.mark.parametrize("path,shape", [
    ("/api/nope", lambda j: isinstance(j["error"], str)),
    ("/v1/nope", lambda j: j["error"]["type"] == "invalid_request_error"),
    ("/v1/messages/nope", lambda j: j["type"] == "error" and j["error"]["type"] == "not_found_error"),
    ("/v1/messagesnope", lambda j: j["error"]["type"] == "invalid_request_error"),  # OpenAI's: not a segment
])
def test_route_errors_take_the_shape_of_the_paths_dialect(server: Server, path: str, shape: Any) -> None:
    r = httpx.get(f"{server.url}{path}")
    assert r.status_code == 404 and shape(r.json()), r.json()


def test_rate_limit_covers_the_registrys_engine_routes(tmp_path: Path) -> None:
    plain = fake_model(tmp_path / "plain", "{{ messages }}")
    config = make_config(tmp_path, {"plain": {"source": str(plain)}}, rate_limit_per_minute=2)
    with serve(config, engine=FakeEngine()) as s:
        body = {"model": "plain", "messages": HI}
        codes = [post(s, "/v1/messages/count_tokens", body).status_code for _ in range(3)]
        listings = [httpx.get(f"{s.url}/api/tags").status_code for _ in range(3)]
    assert codes == [200, 200, 429] and listings == [200] * 3
