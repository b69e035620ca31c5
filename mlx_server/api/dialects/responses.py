"""OpenAI's Responses API (/v1/responses), as the Codex CLI and the openai SDK's `client.responses` use it.

Requests become the same GenerateRequest a chat completion does: `instructions` and the input items (messages,
`function_call`, `function_call_output`, `reasoning`) become chat messages, `function` tools and the members of
`namespace` tools become tools (a member is offered to the model as `namespace.member`, as Ollama does, and its
calls go back as `name` plus `namespace`, which is how Codex routes them), `text.format` the grammar. Tools we
cannot run here (`web_search` and the other hosted tools) are dropped with a log line and an X-MLX-Tools-Ignored
header, never a 400: Codex always sends one.

State, beyond Ollama's stateless route: with `store` (default true, as OpenAI) the response and its conversation
are kept (api/responses_store.py), and `previous_response_id` continues it: that conversation plus the new input,
whose shared prefix the engine's prompt cache serves. `GET /v1/responses/{id}`, `DELETE` and `input_items` read
the store. The replies are shaped in responses_reply.py, their streams in responses_stream.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_server.api.context import ctx_of, field_type
from mlx_server.api.dialects.base import TOOLS_IGNORED_HEADER, Call, Generation, Incoming, named_model
from mlx_server.api.dialects.compat import arguments_object, effort_level, new_id
from mlx_server.api.dialects.openai import content_text, forced_choice, output_format
from mlx_server.api.dialects.responses_reply import Shape, final
from mlx_server.api.dialects.responses_stream import encode
from mlx_server.api.dialects.sampling import OPENAI_DEFAULTS, resolve_sampling
from mlx_server.api.responses_store import ResponseStore, StoredResponse
from mlx_server.contract.errors import BadRequest, NotFound
from mlx_server.contract.requests import ChatMessage, GenerateRequest, ToolChoice

log = logging.getLogger("mlx_server.api.responses")

# ---- input ----------------------------------------------------------------------------------------------------


def _reasoning_text(item: dict[str, Any]) -> str:
    """An earlier turn's thinking from a reasoning item: our own encrypted_content is the text itself."""
    encrypted = item.get("encrypted_content")
    if isinstance(encrypted, str) and encrypted:
        return encrypted
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict))
            if text:
                return text
    return ""


def _with_id(item: dict[str, Any], prefix: str) -> dict[str, Any]:
    return item if item.get("id") else {**item, "id": new_id(prefix)}


def parse_input(raw: Any) -> tuple[list[ChatMessage], list[dict[str, Any]]]:
    """The input as chat messages, and as items with ids (what `input_items` lists)."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}]
    if not isinstance(raw, list):
        raise BadRequest('invalid value for field "input": expected a string or an array of items')
    messages: list[ChatMessage] = []
    items: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call_id → function name, so outputs can name their tool
    thinking: Optional[str] = None  # a reasoning item's text, for the assistant turn that follows it
    open_turn: Optional[ChatMessage] = None  # the assistant turn that consecutive function calls join
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: expected an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise BadRequest(f"{where}.role must be one of user, system, developer, assistant")
            text, images = content_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                open_turn = ChatMessage("assistant", text, thinking=thinking, images=images)
                messages.append(open_turn)
                thinking = None
            else:
                messages.append(ChatMessage("system" if role == "developer" else role, text, images=images))
                open_turn = None
            items.append(_with_id({**item, "type": "message"}, "msg_"))
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"{where}: a function_call needs a name and a call_id")
            namespace = item.get("namespace")
            if isinstance(namespace, str) and namespace and not name.startswith(f"{namespace}."):
                name = f"{namespace}.{name}"  # as the tool is offered to the model
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments_object(item.get("arguments"), where)},
            }
            names[call_id] = name
            if open_turn is None:
                open_turn = ChatMessage("assistant", "", thinking=thinking)
                messages.append(open_turn)
                thinking = None
            open_turn.tool_calls = [*(open_turn.tool_calls or []), call]
            items.append(_with_id(item, "fc_"))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else content_text(output, f"{where}.output")[0]
            messages.append(ChatMessage("tool", text, tool_call_id=call_id, tool_name=names.get(str(call_id))))
            open_turn = None
            items.append(_with_id(item, "fco_"))
        elif kind == "reasoning":
            thinking = _reasoning_text(item) or None
            items.append(_with_id(item, "rs_"))
        else:
            raise BadRequest(f"{where}: unsupported input item type {kind!r}")
    return messages, items


# ---- tools ----------------------------------------------------------------------------------------------------


def _function(tool: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}: a function tool needs a name")
    if prefix and not name.startswith(prefix):
        name = prefix + name
    fn: dict[str, Any] = {"name": name, "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def parse_tools(raw: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat-style function tools, and the types of the tools dropped because nothing here can run them."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise BadRequest('invalid value for field "tools": expected an array')
    tools, dropped = [], []
    for i, tool in enumerate(raw):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            tools.append(_function(tool, "", f"tools[{i}]"))
        elif kind == "namespace":
            prefix = f"{tool.get('name')}." if tool.get("name") else ""
            for j, member in enumerate(tool.get("tools") or []):
                if isinstance(member, dict) and member.get("type", "function") == "function":
                    tools.append(_function(member, prefix, f"tools[{i}].tools[{j}]"))
        elif isinstance(kind, str):
            dropped.append(kind)
        else:
            raise BadRequest(f"tools[{i}]: expected an object with a type")
    return tools, dropped


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Optional[ToolChoice]]:
    if choice in (None, "auto") or (isinstance(choice, dict) and choice.get("type") == "allowed_tools"):
        return tools, None
    if choice == "none":
        return [], None
    named = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    return tools, forced_choice(choice, named, tools)


def _format(text: Any) -> Any:
    fmt = text.get("format") if isinstance(text, dict) else None
    schema = fmt.get("schema") if isinstance(fmt, dict) else None
    return output_format(fmt, schema, "text.format", "text.format.schema")


# ---- the request ----------------------------------------------------------------------------------------------


def _store(incoming: Incoming) -> ResponseStore:
    store = incoming.ctx.responses
    assert store is not None, "create_app builds the response store"
    return store


def build(incoming: Incoming) -> Call:
    body = incoming.body
    if body.get("background") is True:
        raise BadRequest("background responses are not supported")
    if body.get("conversation") is not None:
        raise BadRequest("conversation objects are not supported; use previous_response_id")
    instructions = field_type(body, "instructions", str, "a string")
    previous_id = field_type(body, "previous_response_id", str, "a string")
    history: list[ChatMessage] = []
    if previous_id:
        previous = _store(incoming).get(previous_id)
        if previous is None:
            raise NotFound(f"Previous response with id '{previous_id}' not found.")
        history = list(previous.conversation)
    messages, items = parse_input(body.get("input"))
    conversation = [*history, *messages]
    if not conversation:
        raise BadRequest('invalid value for field "input": expected at least one item')
    tools, dropped = parse_tools(body.get("tools"))
    tools, forced = _tool_choice(body.get("tool_choice"), tools)
    max_tokens = field_type(body, "max_output_tokens", int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest('invalid value for field "max_output_tokens": must be at least 1')
    sampling = {k: field_type(body, k, (int, float), "a number") for k in ("temperature", "top_p")}
    resolved = resolve_sampling(incoming.model_options, {**sampling, "num_predict": max_tokens}, OPENAI_DEFAULTS)
    reasoning = field_type(body, "reasoning", dict, "an object") or {}
    effort = reasoning.get("effort")
    include = field_type(body, "include", list, "an array") or []
    stream = field_type(body, "stream", bool, "a boolean") is True
    store = field_type(body, "store", bool, "a boolean") is not False
    req = GenerateRequest(
        model=incoming.name,
        messages=([ChatMessage("system", instructions)] if instructions else []) + conversation,
        sampling=resolved.sampling,
        max_tokens=resolved.max_tokens,
        num_ctx=resolved.num_ctx,
        stop=resolved.stop,
        truncate=body.get("truncation") == "auto",  # "disabled", the default, refuses an over-long input
        format=_format(body.get("text")),
        tools=tools or None,
        force_tool=forced,
        think=(effort != "none") if isinstance(effort, str) else None,
        think_level=effort_level(effort),
        cache_key=field_type(body, "prompt_cache_key", str, "a string"),
        priority=incoming.priority,
        timeout=incoming.timeout,
        created=incoming.arrival,
    )
    shape = Shape(
        id=new_id("resp_"),
        created_at=int(time.time()),
        requested=incoming.requested,
        body=body,
        stream=stream,
        store=store,
        summary=reasoning.get("summary") is not None,
        encrypted="reasoning.encrypted_content" in include,
        input_items=items,
        conversation=conversation,
        temperature=resolved.sampling.temperature,
        top_p=resolved.sampling.top_p,
    )
    headers = incoming.tools_note(tools) if forced is None else {}
    if dropped:
        kinds = ", ".join(sorted(set(dropped)))
        if f"hosted:{kinds}" not in incoming.ctx.tools_warned:  # Codex sends its web_search on every turn
            incoming.ctx.tools_warned.add(f"hosted:{kinds}")
            log.warning("responses: dropping tools this server cannot run (logged once): %s", kinds)
        note = f"hosted tools are not available here: {kinds}"
        headers[TOOLS_IGNORED_HEADER] = "; ".join(filter(None, (headers.get(TOOLS_IGNORED_HEADER), note)))
    return Call(req, stream=stream, shape=shape, headers=headers)


CREATE = Generation(named_model("you must provide a model parameter"), build, encode, final, verb="chat")


# ---- the stored responses -------------------------------------------------------------------------------------


def _stored(request: Request) -> tuple[ResponseStore, StoredResponse]:
    store = ctx_of(request).responses
    assert store is not None, "create_app builds the response store"
    rid = request.path_params["response_id"]
    entry = store.get(rid)
    if entry is None:
        raise NotFound(f"Response with id '{rid}' not found.")
    return store, entry


async def retrieve(request: Request) -> Response:
    return JSONResponse(_stored(request)[1].response)


async def delete(request: Request) -> Response:
    store, entry = _stored(request)
    store.delete(entry.response["id"])
    return JSONResponse({"id": entry.response["id"], "object": "response", "deleted": True})


async def input_items(request: Request) -> Response:
    _, entry = _stored(request)
    items = list(entry.input_items)
    if request.query_params.get("order", "desc") == "desc":
        items.reverse()
    limit = request.query_params.get("limit")
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise BadRequest("limit must be an integer between 1 and 100")
        items = items[: int(limit)]
    return JSONResponse(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": len(items) < len(entry.input_items),
        }
    )


__all__ = ["CREATE", "delete", "input_items", "parse_input", "parse_tools", "retrieve"]
