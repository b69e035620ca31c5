"""The Anthropic dialect: /v1/messages and /v1/messages/count_tokens, translated to and from the engine.

Nothing here generates. Requests are translated in anthropic_request.py; this module shapes the replies: the
message object, and streams as SSE with Anthropic's event names (the input token count in `message_start` comes
from the engine's Started event; a tool call's input streams as `input_json_delta`s while it is generated).
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from mlx_server.api.context import Collected
from mlx_server.api.dialects.anthropic_request import build_count, build_message
from mlx_server.api.dialects.base import Call, Generation, Incoming, named_model
from mlx_server.api.dialects.compat import json_dumps, new_id, tool_pieces
from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Delta, Done, Event, Failed, Started, ToolCallDelta, Usage

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
