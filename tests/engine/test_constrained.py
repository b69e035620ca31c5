"""Structured output is enforced: every constrained reply of a random-weight model parses and validates.

Random weights are the hardest case: nothing but the grammar pushes the output toward JSON, so any hole in the
masking, in EOS forcing or in closing within the token budget shows up as an invalid reply.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import jsonschema
import ollama
import pytest

from mlx_server.engine.core import Engine
from mlx_server.errors import BadRequest
from mlx_server.types import (ChatMessage, Delta, Done, Event, Failed, GenerateRequest, SamplingParams, Started,
                              ToolChoice)
from serving import make_config, serve

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
NESTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "ok": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "maxLength": 6}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "ok", "address"],
    "additionalProperties": False,
}
LIST: dict[str, Any] = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4,
                             "items": {"type": "object", "properties": {"n": {"type": "number"}},
                                       "required": ["n"], "additionalProperties": False}}},
    "required": ["items"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine(tiny_llama: Path, tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    cfg = make_config(tmp_path_factory.mktemp("constrained"),
                      {"tiny": {"source": str(tiny_llama)}, "tiny3": {"source": str(tiny_llama3)}})
    eng = Engine(cfg)
    eng.start()
    yield eng
    eng.stop()


def request(fmt: Any = None, seed: int = 0, max_tokens: int = 160, model: str = "tiny", **kw: Any) -> GenerateRequest:
    return GenerateRequest(model=model, messages=[ChatMessage("user", "Describe a person as JSON.")], format=fmt,
                           sampling=SamplingParams(temperature=1.0, seed=seed), max_tokens=max_tokens, **kw)


async def run(engine: Engine, req: GenerateRequest) -> tuple[str, list[dict[str, Any]], Done]:
    text, done = "", None
    calls: list[dict[str, Any]] = []
    async for event in engine.stream(req):
        if isinstance(event, Delta):
            text += event.content
            calls.extend(event.tool_calls)
        elif isinstance(event, Done):
            done = event
        elif isinstance(event, Failed):
            raise event.error
    assert done is not None
    return text, calls, done


def run_all(engine: Engine, reqs: list[GenerateRequest]) -> list[tuple[str, list[dict[str, Any]], Done]]:
    async def main() -> list[tuple[str, list[dict[str, Any]], Done]]:
        return list(await asyncio.gather(*(run(engine, r) for r in reqs)))

    return asyncio.run(main())


@pytest.mark.parametrize("schema", [PERSON, NESTED, LIST], ids=["person", "nested", "list"])
def test_every_seed_validates(engine: Engine, schema: dict[str, Any]) -> None:
    results = run_all(engine, [request(schema, seed) for seed in range(30)])
    for seed, (text, _, done) in enumerate(results):
        assert done.reason == "stop", f"seed {seed}: grammar did not end the reply: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_json_mode_closes_within_a_tight_budget(engine: Engine) -> None:
    """Free-form JSON (any object) on a 24-token budget: the processor steers toward closing in time."""
    results = run_all(engine, [request("json", seed, max_tokens=24) for seed in range(20)])
    for text, _, done in results:
        assert isinstance(json.loads(text), dict), text
        assert done.usage.completion_tokens <= 24


def test_greedy_constrained_is_deterministic(engine: Engine) -> None:
    greedy = SamplingParams(temperature=0.0)
    a, b = run_all(engine, [GenerateRequest(model="tiny", messages=[ChatMessage("user", "hi")], format=PERSON,
                                            sampling=greedy, max_tokens=120) for _ in range(2)])
    assert a[0] == b[0]
    jsonschema.validate(json.loads(a[0]), PERSON)


def test_constrained_and_free_requests_share_decode_steps(engine: Engine) -> None:
    before = engine.counters
    (free, _, free_done), (constrained, _, _) = run_all(engine, [request(None, 1, max_tokens=60),
                                                                 request(PERSON, 2, max_tokens=160)])
    after = engine.counters
    jsonschema.validate(json.loads(constrained), PERSON)
    assert free_done.usage.completion_tokens == 60 and free_done.reason == "length"
    steps = after.steps - before.steps
    generated = after.generated_tokens - before.generated_tokens
    assert generated > steps, "the two sequences never shared a decode step"


def test_invalid_schema_is_a_bad_request(engine: Engine) -> None:
    with pytest.raises(BadRequest):
        run_all(engine, [request({"type": "object", "properties": {"a": {"type": "no-such-type"}}})])


def test_forced_tool_call_in_qwen_format(engine: Engine) -> None:
    reqs = [request(seed=s, tools=[WEATHER_TOOL, TIME_TOOL], force_tool=ToolChoice("get_weather"))
            for s in range(4)]
    for text, calls, done in run_all(engine, reqs):
        assert text == ""  # the <tool_call> block never leaks into content
        assert calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
        assert done.reason == "tool_calls"


def test_required_tool_call_picks_one_of_the_tools(engine: Engine) -> None:
    reqs = [request(seed=s, tools=[WEATHER_TOOL, TIME_TOOL], force_tool=ToolChoice()) for s in range(6)]
    for _, calls, done in run_all(engine, reqs):
        assert len(calls) == 1 and calls[0]["function"]["name"] in ("get_weather", "get_time")
        assert done.reason == "tool_calls"


def test_forced_tool_call_in_llama3_format(engine: Engine) -> None:
    """Llama 3 writes bare JSON with "parameters"; mlx_lm has no parser for it, ours takes the whole reply."""
    [(text, calls, done)] = run_all(engine, [request(model="tiny3", tools=[WEATHER_TOOL],
                                                     force_tool=ToolChoice("get_weather"))])
    assert text == ""
    assert calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert done.reason == "tool_calls"


def test_count_only_tokenizes_without_generating(engine: Engine) -> None:
    async def main() -> list[Event]:
        return [e async for e in engine.stream(request(count_only=True))]

    events = asyncio.run(main())
    assert [type(e) for e in events] == [Started, Done]
    started: Optional[Started] = events[0]  # type: ignore[assignment]
    assert started is not None and started.prompt_tokens > 5
    assert events[1].usage.completion_tokens == 0  # type: ignore[union-attr]


def test_ollama_format_through_the_server(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"tiny": {"source": str(tiny_llama)}})) as server:
        client = ollama.Client(host=server.url)
        for seed in range(3):
            r = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], format=PERSON,
                            options={"seed": seed, "num_predict": 160})
            jsonschema.validate(json.loads(r.message.content), PERSON)
            assert r.done_reason == "stop"
        g = client.generate(model="tiny", prompt="hi", format="json", stream=True,
                            options={"seed": 9, "num_predict": 40})
        assert isinstance(json.loads("".join(chunk.response for chunk in g)), dict)
