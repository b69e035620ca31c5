"""OpenAI's Responses API (/v1/responses) over a real uvicorn server, driven by the official `openai` SDK's
`client.responses` and by raw bodies shaped like the Codex CLI's (../shared/agent-clients.md)."""

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

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("responses-api")
    thinker = build_thinking_model(tiny_llama, tmp / "thinker")  # its output starts inside <think>
    config = make_config(tmp, {"tiny": {"source": str(tiny_llama), "options": {"num_predict": 16}},
                               "thinker": {"source": str(thinker)}})
    with serve(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_text_answer_equals_the_chat_route(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="tiny", instructions="Be brief.", input="Say hello", temperature=0, max_output_tokens=12
    )
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        temperature=0,
        max_tokens=12,
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens == 12
    assert r.status == "incomplete" and r.incomplete_details is not None  # stopped by max_output_tokens
    assert r.incomplete_details.reason == "max_output_tokens"


def test_stream_events_build_the_same_response(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "input": "Count to three", "temperature": 0, "max_output_tokens": 10}
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    # max_output_tokens ran out: the stream ends in response.incomplete, which carries the whole response (the
    # SDK's get_final_response() waits for response.completed only, with the real API too)
    streamed = events[-1].response  # type: ignore[union-attr]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == streamed.output_text == whole.output_text


def test_retrieve_input_items_and_delete(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="tiny",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "remember me"}]}],
        temperature=0,
    )
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    items = client.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"]
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


# A required call of the weather tool: the grammar forces it, so even the random tiny model makes one.
FORCED_WEATHER: Any = {
    "model": "tiny",
    "input": "What is the weather in Paris?",
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "temperature": 0,
    "max_output_tokens": 40,
}


def test_a_forced_call_and_its_output_continue_the_stored_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(**FORCED_WEATHER)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert "city" in json.loads(calls[0].arguments)
    second = client.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_output_tokens=8,
    )
    assert second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    # the first turn's prompt and answer came back from the prompt cache instead of being prefilled again
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_a_streamed_call_sends_its_arguments_as_they_are_generated(client: openai.OpenAI) -> None:
    events = list(client.responses.create(**FORCED_WEATHER, stream=True))
    kinds = [e.type for e in events]
    [added] = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert added.item.name == "get_weather" and added.item.arguments == "" and added.item.call_id
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2 and all(e.item_id == added.item.id for e in deltas)
    joined = "".join(e.delta for e in deltas)
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    [item_done] = [e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert done.arguments == joined == item_done.item.arguments and "city" in json.loads(joined)
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
    assert kinds.index("response.function_call_arguments.done") < kinds.index("response.output_item.done")
    completed = events[-1]
    assert completed.type == "response.completed"
    [call] = [i for i in completed.response.output if i.type == "function_call"]
    assert call.arguments == joined and call.call_id == added.item.call_id
    whole = client.responses.create(**FORCED_WEATHER)
    assert [i.arguments for i in whole.output if i.type == "function_call"] == [joined]
    # the stored turn carries the streamed call, so its output continues the conversation
    second = client.responses.create(
        model="tiny",
        previous_response_id=completed.response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_output_tokens=4,
    )
    assert second.status in ("completed", "incomplete")


def test_json_schema_output_is_enforced(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = client.responses.create(
        model="tiny",
        input="A number, as JSON",
        text={"format": {"type": "json_schema", "name": "number", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=30,
    )
    jsonschema.validate(json.loads(r.output_text), schema)


def codex_body(**extra: Any) -> dict[str, Any]:
    """A turn shaped like the Codex CLI's: developer and user messages, function, namespace and web_search tools."""
    return {
        "model": "tiny",
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Work in /repo."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
        ],
        "tools": [
            {"type": "function", "name": "shell", "description": "Run a command", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                            "required": ["command"]}},
            {"type": "namespace", "name": "mcp__files", "tools": [
                {"type": "function", "name": "read", "description": "Read a file", "strict": False,
                 "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]},
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
        "client_metadata": {"session": "abc"},
        "temperature": 0,
        "max_output_tokens": 8,
        **extra,
    }


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_codex_shaped_turns(server: Server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/responses", json=codex_body(), timeout=120) as r:
        assert r.status_code == 200
        assert "web_search" in r.headers["x-mlx-tools-ignored"]  # dropped with a note, never a 400
        events = sse_events(r)
    done = events[-1]
    assert done["type"] in ("response.completed", "response.incomplete")
    assert done["response"]["store"] is False
    # store: false keeps nothing
    assert httpx.get(f"{server.url}/v1/responses/{done['response']['id']}").status_code == 404
    # the next turn sends back a reasoning item (our encrypted_content is the text) and a namespaced call's output
    follow_up = codex_body(
        input=[
            *codex_body()["input"],
            {"type": "reasoning", "summary": [], "encrypted_content": "The user wants a listing."},
            {"type": "function_call", "call_id": "call_1", "name": "read", "namespace": "mcp__files",
             "arguments": '{"path": "a"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "hello"},
        ],
        stream=False,
    )
    r2 = httpx.post(f"{server.url}/v1/responses", json=follow_up, timeout=120)
    assert r2.status_code == 200, r2.text
    assert r2.json()["status"] in ("completed", "incomplete")


def test_namespace_members_are_called_by_name_and_namespace(client: openai.OpenAI) -> None:
    """As Codex routes them (it answers "unsupported call" to a call named `mcp__files.read`)."""
    tools: Any = [codex_body()["tools"][1]]
    r = client.responses.create(
        model="tiny", input="Read file a", tools=tools, tool_choice="required", temperature=0, max_output_tokens=40
    )
    calls = [item.model_dump() for item in r.output if item.type == "function_call"]
    assert calls and (calls[0]["name"], calls[0]["namespace"]) == ("read", "mcp__files")
    with client.responses.stream(model="tiny", input="Read file a", tools=tools, tool_choice="required",
                                 temperature=0, max_output_tokens=40) as stream:
        events = [e.model_dump() for e in stream]
    added = next(e["item"] for e in events if e["type"] == "response.output_item.added"
                 and e["item"]["type"] == "function_call")
    done = next(e["item"] for e in events if e["type"] == "response.output_item.done"
                and e["item"]["type"] == "function_call")
    assert (added["name"], added["namespace"]) == (done["name"], done["namespace"]) == ("read", "mcp__files")
    follow = client.responses.create(model="tiny", tools=tools, temperature=0, max_output_tokens=4, input=[
        {"role": "user", "content": "Read file a"},
        {**{k: calls[0][k] for k in ("type", "call_id", "name", "namespace", "arguments")}},
        {"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "hello"}])
    assert follow.status in ("completed", "incomplete")


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "tiny", "input": [{"type": "telepathy"}]}, 400, "telepathy"),
    ({"model": "tiny", "input": "x", "previous_response_id": "resp_missing"}, 404, "resp_missing"),
    ({"model": "tiny", "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "tiny", "input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ({"model": "ghost", "input": "x"}, 404, "ghost"),
    ({"model": "tiny", "input": "x", "prompt_cache_key": 5}, 400, "prompt_cache_key"),
])
def test_bad_requests(server: Server, body: dict[str, Any], status: int, needle: str) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_api_version_is_one_codex_accepts(server: Server) -> None:
    version = httpx.get(f"{server.url}/api/version").json()["version"]
    assert tuple(int(p) for p in version.split(".")) >= (0, 13, 4)


def test_reasoning_items_out_and_back(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "thinker", "input": "Think first", "temperature": 0, "max_output_tokens": 6,
                              "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"]}
    r = client.responses.create(**kwargs)
    [item] = [i for i in r.output if i.type == "reasoning"]
    thought = item.summary[0].text
    assert thought and item.encrypted_content == thought  # not encrypted: the text itself, as Ollama does
    assert item.content is not None and item.content[0].text == thought
    assert r.usage is not None and 0 < r.usage.output_tokens_details.reasoning_tokens <= r.usage.output_tokens
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert "response.reasoning_summary_text.delta" in kinds and "response.reasoning_summary_text.done" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert deltas == thought
    # the reasoning item goes back as the model's earlier thinking on the next turn
    again = client.responses.create(model="thinker", temperature=0, max_output_tokens=2, input=[
        {"role": "user", "content": "Think first"}, item.model_dump(exclude_none=True),
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "user", "content": "And now?"}])
    assert again.status in ("completed", "incomplete")
