"""The Anthropic dialect: /v1/messages and /v1/messages/count_tokens, translated to and from the engine.

Nothing here generates. Content blocks map onto ChatMessage fields (text → content, thinking → thinking, tool_use →
tool_calls, tool_result → a `tool` message), so the model's own chat template renders them. Streams are SSE
with Anthropic's event names; the input token count in `message_start` comes from the engine's Started event.
Sampling is request field > models.yaml option > Anthropic's default (temperature 1), see api/dialects/sampling.py.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from mlx_server.api.context import Collected
from mlx_server.api.dialects.base import Call, Generation, Incoming, named_model
from mlx_server.api.dialects.bodies import CountTokensBody, MessagesBody, validated
from mlx_server.api.dialects.compat import json_dumps, new_id, tool_pieces
from mlx_server.api.dialects.images import IMAGE_TAG, anthropic_image
from mlx_server.api.dialects.sampling import ANTHROPIC_DEFAULTS, resolve_sampling
from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.events import Delta, Done, Event, Failed, Started, ToolCallDelta, Usage
from mlx_server.contract.requests import ChatMessage, CountTokensRequest, GenerateRequest, ToolChoice

# ---- request translation ------------------------------------------------------------------------------------


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest(f"{where}: content must be a string or an array of content blocks")
    return content


def _plain(content: Any, where: str) -> tuple[str, Optional[list[str]]]:
    """tool_result / system content: a string or blocks; text joined, each image an [img] tag at its place."""
    if content is None:
        return "", None
    texts, images = [], []
    for j, b in enumerate(_blocks(content, where)):
        if b.get("type") == "text":
            texts.append(str(b.get("text") or ""))
        elif b.get("type") == "image":
            images.append(anthropic_image(b, f"{where}.{j}"))
            texts.append(IMAGE_TAG)
    return "".join(texts), images or None


# Claude Code's first system block: a per-session attribution value ahead of everything else. It tells the model
# nothing, and left in it would make each new session's prompt differ from the first token on, so no session could
# reuse another's cached prefix (measured: 49 of ~31,800 tokens).
BILLING_HEADER = "x-anthropic-billing-header:"


def _without_billing(system: Any) -> Any:
    if not isinstance(system, list):
        return system
    return [
        b
        for b in system
        if not (isinstance(b, dict) and b.get("type") == "text" and str(b.get("text") or "").startswith(BILLING_HEADER))
    ]


def parse_messages(raw: Any, system: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: expected a non-empty array")
    out: list[ChatMessage] = []
    system = _without_billing(system)
    if system is not None:
        text, images = _plain(system, "system")
        if images:
            raise BadRequest("system: images are not supported in the system prompt; send them in a user message")
        out.append(ChatMessage("system", text))
    names: dict[str, str] = {}  # tool_use id → tool name, so results can name their tool
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f'{where}.role: expected "user" or "assistant"')
        texts, thinking, calls, images = [], [], [], []
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
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": b["name"], "arguments": b.get("input") or {}},
                    }
                )
            elif kind == "tool_result" and role == "user":
                call_id = b.get("tool_use_id")
                result, result_images = _plain(b.get("content"), f"{where}.content.{j}.content")
                out.append(
                    ChatMessage(
                        "tool",
                        result,
                        tool_call_id=call_id,
                        tool_name=names.get(call_id or ""),
                        images=result_images,
                    )
                )
            elif kind == "image" and role == "user":
                # A url source is handed on: the engine fetches only hosts in server.fetch_image_urls.
                images.append(anthropic_image(b, f"{where}.content.{j}"))
                texts.append(IMAGE_TAG)
            elif kind == "document":
                raise BadRequest(f"{where}.content.{j}: document blocks are not supported")
            else:
                raise BadRequest(f"{where}.content.{j}: unsupported content block type {kind!r}")
        if texts or calls or thinking or role == "assistant":
            out.append(
                ChatMessage(
                    role,
                    "".join(texts),
                    thinking="".join(thinking) or None,
                    tool_calls=calls or None,
                    images=images or None,
                )
            )
    return out


def _tools(body: dict[str, Any]) -> tuple[Optional[list[dict[str, Any]]], Optional[ToolChoice]]:
    raw = body.get("tools")
    tools: Optional[list[dict[str, Any]]] = None
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in raw):
            raise BadRequest("tools: expected an array of {name, description, input_schema}")
        # Server tools (web search, …) have a "type" other than custom and no schema: we cannot run them.
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {"type": "object"},
                },
            }
            for t in raw
            if t.get("type") in (None, "custom")
        ] or None
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


def _request(incoming: Incoming, body: CountTokensBody, fields: dict[str, Any]) -> GenerateRequest:
    resolved = resolve_sampling(incoming.model_options, fields, ANTHROPIC_DEFAULTS)
    thinking = body.thinking
    req = GenerateRequest(
        model=incoming.name,
        messages=parse_messages(body.messages, body.system),
        sampling=resolved.sampling,
        max_tokens=resolved.max_tokens,
        num_ctx=resolved.num_ctx,
        num_draft=resolved.num_draft,
        stop=resolved.stop,
        think=thinking.get("type") in ("enabled", "adaptive") if isinstance(thinking, dict) else None,
        truncate=False,  # the real API answers an over-long prompt with a 400, which lets Claude Code compact
        priority=incoming.priority,
        timeout=incoming.timeout,
        created=incoming.arrival,
    )
    req.tools, req.force_tool = _tools(incoming.body)
    req.format = _output_format(incoming.body)
    return req


def build_message(incoming: Incoming) -> Call:
    body = validated(MessagesBody, incoming.body, "anthropic")
    req = _request(incoming, body, body.sampling_fields())
    headers = incoming.tools_note(req.tools) if req.force_tool is None else {}
    return Call(req, stream=body.stream, headers=headers)


def build_count(incoming: Incoming) -> Call:
    """Tokenized exactly as /v1/messages would be; the engine counts without loading the model."""
    req = _request(incoming, validated(CountTokensBody, incoming.body, "anthropic"), {})
    return Call(CountTokensRequest(req, priority=req.priority, timeout=req.timeout, created=req.created), stream=False)


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
        # The window, not max_tokens, ended it: Claude Code reads "max_tokens" as having exceeded its own limit.
        return "model_context_window_exceeded" if done.window else "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def usage_json(usage: Usage, output: Optional[int] = None) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens if output is None else output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    return {
        "type": "tool_use",
        "id": call.get("id") or new_id("toolu_"),
        "name": fn["name"],
        "input": fn.get("arguments") or {},
    }


def message_json(
    mid: str, model: str, content: list[dict[str, Any]], done: Optional[Done], usage: Usage
) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(done) if done else None,
        "stop_sequence": done.stop_sequence if done else None,
        "usage": usage_json(usage),
    }


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json_dumps({"type": name, **data}), event=name)


class _Blocks:
    """The stream's content blocks: which one is open (thinking, text or a tool call) and its index."""

    def __init__(self) -> None:
        self.index = -1
        self.block: Optional[str] = None  # "thinking", "text" or "tool_use"
        self.call: Optional[int] = None  # the open tool_use block's call (ToolCallDelta.index)

    def close(self) -> list[ServerSentEvent]:
        if self.block is None:
            return []
        self.block, self.call = None, None
        return [_event("content_block_stop", {"index": self.index})]

    def _open(self, kind: str, start: dict[str, Any]) -> list[ServerSentEvent]:
        out = self.close()
        self.index, self.block = self.index + 1, kind
        return [*out, _event("content_block_start", {"index": self.index, "content_block": start})]

    def text(self, kind: str, text: str) -> list[ServerSentEvent]:
        out = []
        if self.block != kind:
            start = (
                {"type": "thinking", "thinking": "", "signature": ""}
                if kind == "thinking"
                else {"type": "text", "text": ""}
            )
            out = self._open(kind, start)
        piece = (
            {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
        )
        return [*out, _event("content_block_delta", {"index": self.index, "delta": piece})]

    def tool(self, piece: ToolCallDelta) -> list[ServerSentEvent]:
        """A tool_use block opens on its call's first piece (the name, with `input: {}`); the arguments follow
        as input_json_delta pieces; the block closes when anything else starts."""
        out = []
        if self.call != piece.index:
            out = self._open("tool_use", {"type": "tool_use", "id": new_id("toolu_"), "name": piece.name, "input": {}})
            self.call = piece.index
        if piece.arguments:
            delta = {"type": "input_json_delta", "partial_json": piece.arguments}
            out.append(_event("content_block_delta", {"index": self.index, "delta": delta}))
        return out

    def delta(self, delta: Delta) -> list[ServerSentEvent]:
        before, after = tool_pieces(delta, self.call)
        out = [frame for piece in before for frame in self.tool(piece)]
        for kind, text in (("thinking", delta.thinking), ("text", delta.content)):
            if text:
                out += self.text(kind, text)
        return out + [frame for piece in after for frame in self.tool(piece)]


async def encode(incoming: Incoming, call: Call, events: AsyncIterator[Event]) -> AsyncGenerator[Any, None]:
    """message_start, then one content block per run of text / thinking / tool_use, message_delta, message_stop.

    The input token count in message_start comes from the engine's Started event, the first one. Tool calls
    stream from their pieces (Delta.tool_call_deltas): the whole calls in Delta.tool_calls are the same calls.
    """
    mid = new_id("msg_")
    blocks = _Blocks()
    opened = False
    async for event in events:
        if not opened:
            opened = True
            started = event if isinstance(event, Started) else None
            usage = Usage(
                prompt_tokens=started.prompt_tokens if started else 0,
                cached_tokens=started.cached_tokens if started else 0,
            )
            yield _event("message_start", {"message": message_json(mid, incoming.requested, [], None, usage)})
            yield _event("ping", {})
        if isinstance(event, Delta):
            for frame in blocks.delta(event):
                yield frame
        elif isinstance(event, Done):
            for frame in blocks.close():
                yield frame
            yield _event(
                "message_delta",
                {
                    "delta": {"stop_reason": stop_reason(event), "stop_sequence": event.stop_sequence},
                    # the whole usage, as the real API's message_delta carries it (clients read the input side here)
                    "usage": usage_json(event.usage),
                },
            )
            yield _event("message_stop", {})
        elif isinstance(event, Failed):
            yield error_frame(event.error)


def final_message(incoming: Incoming, call: Call, result: Collected) -> dict[str, Any]:
    assert result.done is not None
    content: list[dict[str, Any]] = []
    if result.thinking:
        content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
    if result.content:
        content.append({"type": "text", "text": result.content})
    content.extend(tool_use(c) for c in result.tool_calls)
    return message_json(new_id("msg_"), incoming.requested, content, result.done, result.usage)


def final_count(incoming: Incoming, call: Call, result: Collected) -> dict[str, Any]:
    return {"input_tokens": result.usage.prompt_tokens}


# ---- errors and streams ------------------------------------------------------------------------------------------

# HTTP statuses Starlette itself raises (unknown route, wrong method) and the outer layers' refusals.
_HTTP_TYPES = {
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def error_body(exc: MlxServerError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": exc.anthropic_type, "message": exc.message}}


def http_error_body(status: int, detail: str) -> dict[str, Any]:
    kind = _HTTP_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": detail}}


def error_frame(exc: MlxServerError) -> bytes:
    # The anthropic SDK raises on `event: error`
    return ServerSentEvent(data=json_dumps(error_body(exc)), event="error").encode()


def stream_response(frames: AsyncIterator[Any]) -> Response:
    return EventSourceResponse(frames)


target = named_model("model: Field required")
MESSAGES = Generation(target, build_message, encode, final_message, verb="chat")
COUNT_TOKENS = Generation(target, build_count, encode, final_count, verb="chat")

__all__ = ["COUNT_TOKENS", "MESSAGES", "error_body", "error_frame", "http_error_body", "stream_response"]
