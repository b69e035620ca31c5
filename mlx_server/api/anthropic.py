"""The Anthropic dialect: /v1/messages and /v1/messages/count_tokens, translated to and from the engine.

Nothing here generates. Content blocks map onto ChatMessage fields (text → content, thinking → thinking, tool_use →
tool_calls, tool_result → a `tool` message), so the model's own chat template renders them. Streams are SSE
with Anthropic's event names; the input token count in `message_start` comes from the engine's Started event.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_server.api.common import AppContext, begin, collect, ctx_of, follow, note_model, read_json, request_log
from mlx_server.api.compat import integer, json_dumps, new_id, number, stop_list
from mlx_server.api.errors_shape import anthropic_error
from mlx_server.errors import BadRequest
from mlx_server.types import (ChatMessage, Delta, Done, Event, Failed, GenerateRequest, Priority, SamplingParams,
                              Started, ToolChoice, Usage)


# ---- request translation ------------------------------------------------------------------------------------


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest(f"{where}: content must be a string or an array of content blocks")
    return content


def _plain(content: Any, where: str) -> str:
    """tool_result / system content: a string or text blocks."""
    if content is None:
        return ""
    texts = []
    for b in _blocks(content, where):
        if b.get("type") == "text":
            texts.append(str(b.get("text") or ""))
        elif b.get("type") == "image":
            raise BadRequest("this model does not support images")
    return "".join(texts)


def parse_messages(raw: Any, system: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: expected a non-empty array")
    out: list[ChatMessage] = []
    if system is not None:
        out.append(ChatMessage("system", _plain(system, "system")))
    names: dict[str, str] = {}  # tool_use id → tool name, so results can name their tool
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"{where}.role: expected \"user\" or \"assistant\"")
        texts, thinking, calls = [], [], []
        for j, b in enumerate(_blocks(m.get("content"), f"{where}.content")):
            kind = b.get("type")
            if kind == "text":
                texts.append(str(b.get("text") or ""))
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(b.get("thinking") or ""))
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise BadRequest(f"{where}.content.{j}: tool_use needs a name and an input object")
                call_id = b.get("id") or new_id("toolu_")
                names[call_id] = b["name"]
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input") or {}}})
            elif kind == "tool_result" and role == "user":
                call_id = b.get("tool_use_id")
                out.append(ChatMessage("tool", _plain(b.get("content"), f"{where}.content.{j}.content"),
                                       tool_call_id=call_id, tool_name=names.get(call_id or "")))
            elif kind in ("image", "document"):
                raise BadRequest("this model does not support images or documents")
            else:
                raise BadRequest(f"{where}.content.{j}: unsupported content block type {kind!r}")
        if texts or calls or thinking or role == "assistant":
            out.append(ChatMessage(role, "".join(texts), thinking="".join(thinking) or None,
                                   tool_calls=calls or None))
    return out


def _tools(body: dict[str, Any]) -> tuple[Optional[list[dict[str, Any]]], Optional[ToolChoice]]:
    raw = body.get("tools")
    tools: Optional[list[dict[str, Any]]] = None
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in raw):
            raise BadRequest("tools: expected an array of {name, description, input_schema}")
        # Server tools (web search, …) have a "type" other than custom and no schema: we cannot run them.
        tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                   "parameters": t.get("input_schema") or {"type": "object"}}}
                 for t in raw if t.get("type") in (None, "custom")] or None
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in (None, "auto"):
        return tools, None
    if kind == "none":
        return None, None
    if not tools:
        raise BadRequest("tool_choice requires tools")
    if kind == "any":
        return tools, ToolChoice()
    if kind == "tool" and isinstance(choice.get("name"), str):
        if choice["name"] not in {t["function"]["name"] for t in tools}:
            raise BadRequest(f"tool_choice names a tool that is not in tools: {choice['name']!r}")
        return tools, ToolChoice(choice["name"])
    raise BadRequest("tool_choice: type must be auto, any, tool or none")


def build_request(ctx: AppContext, body: dict[str, Any], request: Request, name: str,
                  count_only: bool = False) -> GenerateRequest:
    max_tokens = integer(body, "max_tokens", 1)
    if max_tokens is None and not count_only:
        raise BadRequest("max_tokens: Field required")
    options = ctx.config.models[name].options
    thinking = body.get("thinking")
    think = None
    if isinstance(thinking, dict):
        think = thinking.get("type") in ("enabled", "adaptive")
    req = GenerateRequest(
        model=name, messages=parse_messages(body.get("messages"), body.get("system")),
        sampling=SamplingParams(temperature=number(body, "temperature", 0, 1, 1.0) or 0.0,
                                top_p=number(body, "top_p", 0, 1, 1.0) or 0.0,
                                top_k=integer(body, "top_k", 0, None, 0) or 0),
        max_tokens=max_tokens, stop=stop_list(body, "stop_sequences"), think=think,
        num_ctx=options.get("num_ctx") if isinstance(options.get("num_ctx"), int) else None,
        priority=Priority.parse(request.headers.get("x-request-priority")),
        timeout=ctx.config.server.request_timeout, count_only=count_only)
    req.tools, req.force_tool = _tools(body)
    req.format = _output_format(body)
    return req


def _output_format(body: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Structured outputs: `output_config.format` (or the older top-level `output_format`) with a JSON schema."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else body.get("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequest("output_config.format: expected {type: json_schema, schema: {...}}")
    return fmt["schema"]


# ---- response translation -----------------------------------------------------------------------------------


def stop_reason(done: Done) -> str:
    if done.reason == "tool_calls":
        return "tool_use"
    if done.reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def usage_json(usage: Usage, output: Optional[int] = None) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "output_tokens": usage.completion_tokens if output is None else output,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": usage.cached_tokens}


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    return {"type": "tool_use", "id": call.get("id") or new_id("toolu_"), "name": fn["name"],
            "input": fn.get("arguments") or {}}


def message_json(mid: str, model: str, content: list[dict[str, Any]], done: Optional[Done],
                 usage: Usage) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(done) if done else None,
            "stop_sequence": done.stop_sequence if done else None, "usage": usage_json(usage)}


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json_dumps({"type": name, **data}), event=name)


async def sse(events: AsyncIterator[Event], first: Event, model: str, started_at: float
              ) -> AsyncIterator[ServerSentEvent]:
    """message_start, then one content block per run of text / thinking / tool_use, message_delta, message_stop."""
    mid, index = new_id("msg_"), -1
    block: Optional[str] = None  # type of the open content block
    started = first if isinstance(first, Started) else None
    usage = Usage(prompt_tokens=started.prompt_tokens if started else 0,
                  cached_tokens=started.cached_tokens if started else 0)
    yield _event("message_start", {"message": {**message_json(mid, model, [], None, usage)}})
    yield _event("ping", {})
    async with contextlib.aclosing(follow(events, first, "anthropic", model, started_at)) as stream:
        async for event in stream:
            if isinstance(event, Delta):
                for kind, text in (("thinking", event.thinking), ("text", event.content)):
                    if not text:
                        continue
                    if block != kind:
                        if block is not None:
                            yield _event("content_block_stop", {"index": index})
                        index, block = index + 1, kind
                        start = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                            else {"type": "text", "text": ""}
                        yield _event("content_block_start", {"index": index, "content_block": start})
                    delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" \
                        else {"type": "text_delta", "text": text}
                    yield _event("content_block_delta", {"index": index, "delta": delta})
                for call in event.tool_calls:
                    if block is not None:
                        yield _event("content_block_stop", {"index": index})
                    index, block = index + 1, None
                    use = tool_use(call)
                    yield _event("content_block_start", {"index": index, "content_block": {**use, "input": {}}})
                    yield _event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": json_dumps(use["input"])}})
                    yield _event("content_block_stop", {"index": index})
            elif isinstance(event, Done):
                if block is not None:
                    yield _event("content_block_stop", {"index": index})
                yield _event("message_delta", {
                    "delta": {"stop_reason": stop_reason(event), "stop_sequence": event.stop_sequence},
                    "usage": {"output_tokens": event.usage.completion_tokens}})
                yield _event("message_stop", {})
            elif isinstance(event, Failed):
                yield ServerSentEvent(data=json_dumps(anthropic_error(event.error)), event="error")


async def _start(request: Request, count_only: bool) -> tuple[str, GenerateRequest, dict[str, Any]]:
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise BadRequest("model: Field required")
    name = ctx.resolve(requested)
    note_model(request, name)
    return requested, build_request(ctx, body, request, name, count_only), body


async def messages(request: Request) -> Response:
    started_at = time.perf_counter()
    requested, req, body = await _start(request, count_only=False)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected a boolean")
    events, first = await begin(request, req)
    if stream:
        return EventSourceResponse(sse(events, first, requested, started_at))
    result = await collect(events, request, first)
    request_log("anthropic", requested, "ok", result.usage, started_at)
    assert result.done is not None
    content: list[dict[str, Any]] = []
    if result.thinking:
        content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
    if result.content:
        content.append({"type": "text", "text": result.content})
    content.extend(tool_use(c) for c in result.tool_calls)
    return JSONResponse(message_json(new_id("msg_"), requested, content, result.done, result.usage))


async def count_tokens(request: Request) -> Response:
    _, req, _ = await _start(request, count_only=True)
    events, first = await begin(request, req)
    result = await collect(events, request, first)
    return JSONResponse({"input_tokens": result.started.prompt_tokens if result.started else 0})


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]

__all__ = ["routes"]
