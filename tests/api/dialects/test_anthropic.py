"""The Anthropic dialect through the official `anthropic` client against a real server and tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import pytest

from support.serving import Server, make_config, serve
from support.thinking_model import build_thinking_model
from support.tinymodels import build_tiny_model

HI = [{"role": "user", "content": "Hello there, how are you?"}]
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("anthropic")
    thinker = build_thinking_model(tiny_llama, tmp / "thinker")
    # Large EOS rows: greedy replies end on their own within a few tokens, so end_turn can be seen.
    stopper = build_tiny_model(tmp / "stopper", arch="llama", seed=3, eos_row_scale=5.0)
    cfg = make_config(tmp, {"tiny": {"source": str(tiny_llama)}, "thinker": {"source": str(thinker)},
                            "stopper": {"source": str(stopper)}})
    with serve(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


# anthropic 2.x dropped the sampling keywords from its signatures; the API still takes them, via extra_body.
GREEDY = {"temperature": 0}


def greedy(client: anthropic.Anthropic, **kw: Any) -> Any:
    return client.messages.create(**{"model": "tiny", "messages": HI, "max_tokens": 8, "extra_body": GREEDY, **kw})


def sse_events(server: Server, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a raw /v1/messages stream."""
    events, name = [], ""
    with httpx.stream("POST", f"{server.url}/v1/messages", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_message_shape_and_usage(client: anthropic.Anthropic) -> None:
    m = greedy(client, system="Answer briefly.")
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 8
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) > 10


def test_end_turn(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="stopper", messages=HI, max_tokens=64, extra_body=GREEDY)
    assert m.stop_reason == "end_turn" and m.usage.output_tokens < 64


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    full = greedy(client, max_tokens=12).content[0].text
    stop = full[4:6]
    m = greedy(client, max_tokens=12, stop_sequences=[stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[: full.index(stop)]


def test_stream_event_sequence(server: Server, client: anthropic.Anthropic) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 6, "temperature": 0}
    events = sse_events(server, body)
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[1] == "content_block_start"
    assert set(names[2:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    counted = client.messages.count_tokens(model="tiny", messages=HI).input_tokens
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] == counted  # known up front
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 6
    assert delta["usage"]["input_tokens"] + delta["usage"]["cache_read_input_tokens"] == counted  # as the real API

    with client.messages.stream(model="tiny", messages=HI, max_tokens=6, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == greedy(client, max_tokens=6).content[0].text


def test_count_tokens(client: anthropic.Anthropic) -> None:
    plain = client.messages.count_tokens(model="tiny", messages=HI).input_tokens
    with_system = client.messages.count_tokens(model="tiny", messages=HI,
                                               system=[{"type": "text", "text": "You are a pirate. " * 8}])
    with_tools = client.messages.count_tokens(model="tiny", messages=HI, tools=[WEATHER])
    assert 10 < plain < with_system.input_tokens and plain + 20 < with_tools.input_tokens


@pytest.mark.parametrize("body, status, kind", [
    ({"model": "tiny", "messages": HI}, 400, "invalid_request_error"),  # max_tokens is required
    ({"model": "nope", "messages": HI, "max_tokens": 5}, 404, "not_found_error"),
    ({"model": "tiny", "messages": HI, "max_tokens": 5, "temperature": 1.5}, 400, "invalid_request_error"),
    ({"model": "tiny", "messages": [{"role": "bot", "content": "x"}], "max_tokens": 5}, 400, "invalid_request_error"),
])
def test_errors_in_anthropic_shape(server: Server, body: dict[str, Any], status: int, kind: str) -> None:
    r = httpx.post(f"{server.url}/v1/messages", json=body, timeout=30)
    assert r.status_code == status
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and r.json()["error"]["message"]


def test_sdk_raises_typed_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", messages=HI, max_tokens=5)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.post("/v1/messages", cast_to=object, body={"model": "tiny", "messages": HI})


def test_structured_output(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    for _ in range(3):
        m = client.messages.create(model="tiny", messages=HI, max_tokens=40,
                                   output_config={"format": {"type": "json_schema", "schema": schema}})
        value = json.loads(m.content[0].text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] <= 9


def test_tool_use(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="tiny", messages=HI, max_tokens=80, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use"
    [block] = m.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_")

    with client.messages.stream(model="tiny", messages=HI, max_tokens=80, tools=[WEATHER],
                                tool_choice={"type": "any"}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert "input_json" in [e.type for e in events]
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}
    # The arguments stream as they are generated: the block opens with the name and an empty input, then the
    # JSON comes in several pieces that join to the final input.
    [start] = [e for e in events if e.type == "content_block_start" and e.content_block.type == "tool_use"]
    assert start.content_block.name == "get_weather" and start.content_block.input == {}
    assert start.content_block.id.startswith("toolu_")
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == start.index]
    assert len(pieces) > 2 and "".join(pieces) == json.dumps({"city": "Paris"}, separators=(",", ":"))
    stops = [e for e in events if e.type == "content_block_stop" and e.index == start.index]
    assert len(stops) == 1 and events.index(stops[0]) > max(i for i, e in enumerate(events)
                                                           if e.type == "content_block_delta")


def test_tool_results_reach_the_template(client: anthropic.Anthropic) -> None:
    def count(result: str) -> int:
        messages = [*HI, {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": result}]},
                                         {"type": "text", "text": "And tomorrow?"}]}]
        return client.messages.count_tokens(model="tiny", messages=messages, tools=[WEATHER]).input_tokens

    assert count("sunny and twenty one degrees all day long") > count("1") + 5
    m = client.messages.create(model="tiny", max_tokens=2, tools=[WEATHER], messages=[*HI, {
        "role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}, {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "sunny"}]}])
    assert m.usage.output_tokens == 2


def test_thinking_blocks(server: Server, client: anthropic.Anthropic) -> None:
    on = {"type": "enabled", "budget_tokens": 1024}
    m = client.messages.create(model="thinker", messages=HI, max_tokens=6, thinking=on)
    assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking
    events = sse_events(server, {"model": "thinker", "messages": HI, "max_tokens": 6, "thinking": on})
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    deltas = {d["delta"]["type"] for n, d in events if n == "content_block_delta"}
    assert starts == ["thinking"] and deltas == {"thinking_delta"}
    off = client.messages.create(model="thinker", messages=HI, max_tokens=6, thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in off.content)


def test_a_new_claude_code_session_reuses_the_last_ones_prefix(client: anthropic.Anthropic) -> None:
    stable = [{"type": "text", "text": "You are a coding agent in a repository. " * 12,
               "cache_control": {"type": "ephemeral"}}]

    def session(tag: str) -> Any:
        header = {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1; cc_entrypoint=cli; cch={tag};"}
        return greedy(client, system=[header, *stable], messages=[{"role": "user", "content": "Fix main.py"}])

    session("first-session")
    second = session("second-session")
    total = second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0)
    assert (second.usage.cache_read_input_tokens or 0) >= 0.95 * total


def test_claude_code_shaped_body_is_accepted(server: Server) -> None:
    """The fields Claude Code sends beyond the basics (../shared/agent-clients.md) are accepted, not refused."""
    body = {
        "model": "tiny", "max_tokens": 4, "stream": False, "temperature": 0,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1;"},
                   {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": "Read", "description": "read", "input_schema": {"type": "object"}, "defer_loading": True}],
        "thinking": {"type": "enabled", "budget_tokens": 31999, "display": "summarized"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": json.dumps({"device": "x", "session": "y"})},
    }
    r = httpx.post(f"{server.url}/v1/messages?beta=true", json=body, timeout=60,
                   headers={"anthropic-version": "2023-06-01", "anthropic-beta": "context-management-2025-06-27"})
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"
