"""Structured output is enforced: every constrained reply of a random-weight model parses and validates.

Random weights are the hardest case: nothing but the grammar pushes the output toward JSON, so any hole in the
masking, in EOS forcing or in closing within the token budget shows up as an invalid reply.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import anthropic
import jsonschema
import ollama
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.engine.engine import Engine
from mlx_server.contract.errors import BadRequest
from mlx_server.contract.events import Delta, Done, Event, Failed, Started
from mlx_server.contract.requests import ChatMessage, CountTokensRequest, GenerateRequest, SamplingParams, ToolChoice
from mlx_server.engine.prepare.prompt import render
from support.serving import Server, make_config, serve
from support.tinymodels import build_tiny_model

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
    before = engine.status().counters
    (free, _, free_done), (constrained, _, _) = run_all(engine, [request(None, 1, max_tokens=60),
                                                                 request(PERSON, 2, max_tokens=160)])
    after = engine.status().counters
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
        return [e async for e in engine.stream(CountTokensRequest(request()))]

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


# ---- required tool calls for every model, through the real server and the official SDKs -------------------------

# A template that cannot show tools (the word never appears), like Gemma 2's or Phi-3's: mlx_lm infers no format.
PLAIN_TEMPLATE = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
                  "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
PERSON_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "record_person", "description": "Save a person", "parameters": PERSON}}
OFFERED = [WEATHER_TOOL, PERSON_TOOL, TIME_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in OFFERED}
ASK = [{"role": "user", "content": "Who is in Paris?"}]
# tiny: its own json_tools format; tiny3: Llama 3 JSON; plain: no format and a template without tools;
# mistral: a format a grammar cannot force ([TOOL_CALLS] name[ARGS]…) with a template that shows tools.
FORCED_MODELS = ["tiny", "tiny3", "plain", "mistral"]


def variant(out: Path, seed: int, template: Optional[str] = None, parser: Optional[str] = None) -> Path:
    """A tiny model whose tokenizer config names another chat template or tool parser (as real checkpoints do)."""
    model = build_tiny_model(out, seed=seed)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    if template is not None:
        cfg["chat_template"] = template
    if parser is not None:
        cfg["tool_parser_type"] = parser
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module")
def formatless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return variant(tmp_path_factory.mktemp("formatless"), seed=3, template=PLAIN_TEMPLATE)


@pytest.fixture(scope="module")
def tool_server(tiny_llama: Path, tiny_llama3: Path, formatless: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("forced-tools")
    unforceable = variant(tmp / "mistral", seed=4, parser="mistral")
    cfg = make_config(tmp, {"tiny": {"source": str(tiny_llama)}, "tiny3": {"source": str(tiny_llama3)},
                            "plain": {"source": str(formatless)}, "mistral": {"source": str(unforceable)}})
    with serve(cfg) as server:
        yield server


def check_call(name: str, arguments: Any, model: str) -> None:
    assert name in SCHEMAS, f"{model}: called {name!r}, which was not offered"
    jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("model", FORCED_MODELS)
def test_openai_required_and_named_tool_choice_always_call(tool_server: Server, model: str) -> None:
    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0)
    named = {"type": "function", "function": {"name": "record_person"}}
    cases: list[tuple[Any, int]] = [("required", s) for s in range(5)] + [(named, s) for s in range(3)]
    for choice, seed in cases:
        r = client.chat.completions.create(model=model, messages=ASK, tools=OFFERED, tool_choice=choice,
                                           max_tokens=160, temperature=1.0, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", f"{model} {choice} seed {seed}: {c.message.content!r}"
        assert not c.message.content
        [call] = c.message.tool_calls or []
        check_call(call.function.name, json.loads(call.function.arguments), model)
        if choice is named:
            assert call.function.name == "record_person"
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=OFFERED, tool_choice="required",
                                                 max_tokens=160, seed=7, stream=True))
    pieces = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    # As OpenAI streams a call: one index, the name in its first chunk, the arguments in pieces after it.
    assert {tc.index for tc in pieces} == {0} and pieces[0].function and pieces[0].function.name
    assert all(tc.function is None or not tc.function.name for tc in pieces[1:])
    arguments = "".join((tc.function.arguments or "") for tc in pieces if tc.function)
    check_call(pieces[0].function.name, json.loads(arguments), model)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", FORCED_MODELS)
def test_anthropic_any_and_tool_choice_always_use_a_tool(tool_server: Server, model: str) -> None:
    client = anthropic.Anthropic(base_url=tool_server.url, api_key="unused", max_retries=0)
    tools = [{"name": n, "description": "", "input_schema": s} for n, s in SCHEMAS.items()]
    choices: list[Any] = [{"type": "any"}] * 5 + [{"type": "tool", "name": "get_weather"}]
    for choice in choices:
        m = client.messages.create(model=model, messages=ASK, tools=tools, tool_choice=choice, max_tokens=160)
        assert m.stop_reason == "tool_use", f"{model} {choice}: {m.content!r}"
        [block] = m.content
        assert block.type == "tool_use"
        check_call(block.name, block.input, model)
        if choice["type"] == "tool":
            assert block.name == "get_weather"


def test_auto_tool_choice_stays_lenient_without_a_tool_format(tool_server: Server) -> None:
    """Open WebUI attaches tools to every chat: a model with no tool format answers in text, not an error."""
    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="plain", messages=ASK, tools=OFFERED, max_tokens=12, seed=1)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert not r.choices[0].message.tool_calls


def test_tools_reach_the_prompt_only_when_a_call_is_forced_and_the_template_cannot(formatless: Path,
                                                                                   tiny_llama: Path) -> None:
    plain = load_tokenizer(formatless)
    base = GenerateRequest(model="plain", messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])

    def prompt(tok: Any, **kw: Any) -> str:
        req = GenerateRequest(model=base.model, messages=base.messages, **kw)
        return str(tok.decode(render(req, tok, req.model)))

    forced = prompt(plain, tools=OFFERED, force_tool=ToolChoice())
    assert all(name in forced for name in SCHEMAS) and '"arguments"' in forced
    assert forced.count("system") == 1 and "Be brief." in forced  # one system turn, the client's text kept
    named = prompt(plain, tools=OFFERED, force_tool=ToolChoice("get_time"))
    assert "get_time" in named and "record_person" not in named and "get_weather" not in named
    assert prompt(plain, tools=OFFERED) == prompt(plain)  # tool_choice auto: today's prompt, unchanged
    qwen = load_tokenizer(tiny_llama)  # its template lists the tools itself: no second copy
    assert prompt(qwen, tools=OFFERED, force_tool=ToolChoice()).count("record_person") == 1
