"""The OpenAI dialect through the official `openai` client against a real server and tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest

from support.serving import Server, make_config, serve
from support.thinking_model import build_thinking_model

HI = [{"role": "user", "content": "Hello there, how are you?"}]
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}},
                   "required": ["city"], "additionalProperties": False}}}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "kind": {"enum": ["a", "b"]}},
    "required": ["name", "n", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("openai")
    thinker = build_thinking_model(tiny_llama, tmp / "thinker")
    cfg = make_config(tmp, {"tiny": {"source": str(tiny_llama), "aliases": ["tiny-alias"]},
                            "thinker": {"source": str(thinker)},
                            "fresh": {"source": str(tiny_llama)},  # its prompt cache is test_prompt_cache's alone
                            "absent": {"source": str(tmp / "not-downloaded")}})
    with serve(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, **kw: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny", "messages": HI, "max_tokens": 8, "temperature": 0}
    return client.chat.completions.create(**{**args, **kw})


# ---- models ---------------------------------------------------------------------------------------------------


def test_models_lists_present_models_and_aliases(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert {m.id for m in models} == {"tiny", "tiny-alias", "thinker", "fresh"}  # "absent" is not on disk
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models)
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# ---- chat -----------------------------------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client: openai.OpenAI) -> None:
    r = greedy(client, max_completion_tokens=5, max_tokens=None)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_cached_tokens_report_the_reused_prefix(client: openai.OpenAI) -> None:
    first = greedy(client, model="fresh", max_tokens=6)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nothing was ever cached for this model
    history = [*HI, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And then?"}]
    second = greedy(client, model="fresh", messages=history, max_tokens=6)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the whole first prompt is a prefix of the second, and came from the cache; the new turn did not
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens


def test_alias_and_seeded_sampling(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(model="tiny-alias", messages=HI, max_tokens=8, seed=7, temperature=1.0)
    b = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, seed=7, temperature=1.0)
    assert a.model == "tiny-alias"
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_matches_and_reports_usage(client: openai.OpenAI) -> None:
    full = greedy(client).choices[0].message.content
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_marker(server: Server) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=12).choices[0].message.content
    stop = full[4:6]
    for value in (stop, [stop, "never-there"]):
        r = greedy(client, max_tokens=12, stop=value)
        assert r.choices[0].message.content == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    r = greedy(client, max_tokens=5, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy picks the most likely token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert greedy(client, max_tokens=2).choices[0].logprobs is None


def test_penalties_change_the_output_and_repeat_less(client: openai.OpenAI) -> None:
    def tokens(**kw: Any) -> list[str]:
        r = client.completions.create(model="tiny", prompt="1 2 3 4 5", max_tokens=40, temperature=0, logprobs=0,
                                      **kw)
        assert r.usage.completion_tokens == 40
        return r.choices[0].logprobs.tokens

    def repeats(toks: list[str]) -> int:
        # byte-fallback pieces all print as U+FFFD though they are different tokens: leave them out
        text = [t for t in toks if t != "\ufffd"]
        return len(text) - len(set(text))

    plain = tokens()
    assert repeats(plain) >= 4  # greedy, unpenalized, it comes back to tokens it already said
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = tokens(**penalty)
        assert penalized != plain, penalty
        assert repeats(penalized) < repeats(plain) // 2, penalty


@pytest.mark.parametrize("kw, needle", [
    ({"n": 2}, "n > 1"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"frequency_penalty": -5}, "frequency_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tool_choice": "required"}, "tools"),
    ({"messages": []}, "messages"),
])
def test_bad_fields_are_400_in_openai_shape(client: openai.OpenAI, kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": "tiny", "messages": HI, "max_tokens": 2, **kw})
    err = info.value.body
    assert err["type"] == "invalid_request_error" and needle in err["message"]


def test_unknown_model_and_route_errors(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=HI)
    assert info.value.body["code"] == "model_not_found"
    r = httpx.get(f"{server.url}/v1/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json() and "message" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/chat", json={"model": "nope", "messages": HI})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)  # Ollama keeps its own shape


# ---- structured output ------------------------------------------------------------------------------------------


def test_response_format_json_schema_validates(client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for seed in range(5):
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=80, seed=seed, response_format=rf)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"


def test_response_format_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=40, seed=3,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


# ---- tools ------------------------------------------------------------------------------------------------------


def test_forced_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=80, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # arguments travel as a JSON string


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=80, tools=[WEATHER_TOOL],
                                                 tool_choice="required", stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # The first chunk names the call (index, id, type, name, arguments ""); the arguments follow as they are
    # generated, in several chunks that carry only more of them, and join to the non-streamed call's arguments.
    first, *rest = calls
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == "" and len(rest) > 2
    assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    joined = "".join(tc.function.arguments for tc in rest)
    whole = client.chat.completions.create(model="tiny", messages=HI, max_tokens=80, tools=[WEATHER_TOOL],
                                           tool_choice="required").choices[0].message.tool_calls
    assert whole is not None and joined == whole[0].function.arguments and json.loads(joined) == {"city": "Paris"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_and_tool_choice_none_shape_the_prompt(client: openai.OpenAI) -> None:
    def prompt_tokens(result: str, **kw: Any) -> int:
        messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result}]
        return greedy(client, messages=messages, max_tokens=1, **kw).usage.prompt_tokens

    short = prompt_tokens("1")
    assert prompt_tokens("sunny and twenty one degrees all day long") > short + 5
    assert prompt_tokens("1", tools=[WEATHER_TOOL]) > short + 20  # tool definitions are rendered
    assert prompt_tokens("1", tools=[WEATHER_TOOL], tool_choice="none") == short


# ---- thinking ---------------------------------------------------------------------------------------------------


def test_reasoning_content(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="thinker", messages=HI, max_tokens=6, seed=1)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] and not message.content
    chunks = list(client.chat.completions.create(model="thinker", messages=HI, max_tokens=6, seed=1, stream=True))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert streamed == message.model_extra["reasoning_content"]
    dropped = client.chat.completions.create(model="thinker", messages=HI, max_tokens=6, seed=1,
                                             reasoning_effort="none")
    assert "reasoning_content" not in (dropped.choices[0].message.model_extra or {})
    assert not dropped.choices[0].message.content


# ---- legacy completions -------------------------------------------------------------------------------------------


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length" and r.usage.completion_tokens == 5
    assert len(choice.logprobs.tokens) == 5 and "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    echoed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "Once upon a time" + choice.text
    streamed = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == "length"
