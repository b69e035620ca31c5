"""The OpenAI dialect's replies: engine events shaped as chat.completion / text_completion JSON and SSE chunks.

openai.py turns a request into a Call whose `shape` is a Reply; this module turns what the engine produced back into
OpenAI's objects: the whole reply at once (`final`), or SSE chunks ending in `data: [DONE]` (`encode`), where an
error after the first chunk is one more `data: {"error": …}` event. Also OpenAI's error bodies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from mlx_server.api.context import Collected
from mlx_server.api.dialects.base import Call, Incoming
from mlx_server.api.dialects.compat import json_dumps, new_id, tool_pieces
from mlx_server.contract.errors import ContextTooLong, MlxServerError, ModelNotFound
from mlx_server.contract.events import Delta, Done, Event, Failed, TokenLogprob, ToolCallDelta, Usage

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


@dataclass
class Reply:
    """How to shape the response for one request."""

    requested: str
    chat: bool
    stream: bool
    include_usage: bool
    echo: str = ""
    legacy_logprobs: bool = False  # /v1/completions' {"tokens", "token_logprobs", …} shape


# ---- replies ------------------------------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def tool_calls_json(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        fn = call["function"]
        out.append(
            {
                "id": call.get("id") or new_id("call_"),
                "type": "function",
                "function": {"name": fn["name"], "arguments": json_dumps(fn.get("arguments") or {})},
            }
        )
    return out


def tool_piece_json(piece: ToolCallDelta) -> dict[str, Any]:
    """A streamed call's piece: the first names it (with an id), the rest carry only more of its arguments."""
    if piece.name:
        fn = {"name": piece.name, "arguments": piece.arguments}
        return {"index": piece.index, "id": new_id("call_"), "type": "function", "function": fn}
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


def _lp(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def logprobs_json(
    lps: tuple[TokenLogprob, ...] | list[TokenLogprob], legacy: bool, offset: int = 0
) -> Optional[dict[str, Any]]:
    if not lps:
        return None
    if legacy:
        offsets, pos = [], offset
        for lp in lps:
            offsets.append(pos)
            pos += len(lp.token)
        return {
            "tokens": [lp.token for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps],
            "text_offset": offsets,
        }
    return {
        "content": [{**_lp(lp.token, lp.logprob), "top_logprobs": [_lp(t, v) for t, v in lp.top]} for lp in lps],
        "refusal": None,
    }


def _envelope(cid: str, reply: Reply, created: int, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if reply.chat else "text_completion"
    return {
        "id": cid,
        "object": kind,
        "created": created,
        "model": reply.requested,
        "system_fingerprint": "fp_mlx_server",
    }


def chunk_json(
    cid: str,
    reply: Reply,
    created: int,
    delta: Optional[Delta],
    finish: Optional[str] = None,
    offset: int = 0,
    piece: Optional[ToolCallDelta] = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    lps = logprobs_json(delta.logprobs, reply.legacy_logprobs, offset) if delta else None
    if reply.chat:
        d: dict[str, Any] = {}
        if delta and delta.thinking:
            d["reasoning_content"] = delta.thinking
        if delta and delta.content:
            d["content"] = delta.content
        if piece is not None:
            d["tool_calls"] = [tool_piece_json(piece)]
        choice["delta"] = d
    else:
        choice["text"] = delta.content if delta else ""
    choice.update({"logprobs": lps, "finish_reason": finish})
    out = {**_envelope(cid, reply, created, chunk=True), "choices": [choice]}
    if reply.include_usage:
        out["usage"] = None
    return out


async def encode(incoming: Incoming, call: Call, events: AsyncIterator[Event]) -> AsyncGenerator[Any, None]:
    reply: Reply = call.shape
    cid, created = new_id("chatcmpl-" if reply.chat else "cmpl-"), int(time.time())
    offset, streaming = len(reply.echo), None  # the index of the tool call being streamed
    if reply.chat:
        opening = chunk_json(cid, reply, created, None)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield {"data": json_dumps(opening)}
    elif reply.echo:
        yield {"data": json_dumps(chunk_json(cid, reply, created, Delta(0, content=reply.echo)))}
    async for event in events:
        if isinstance(event, Delta):
            # Tool calls stream from their pieces (the whole calls in event.tool_calls are the same calls).
            before, after = tool_pieces(event, streaming)
            for piece in before:
                yield {"data": json_dumps(chunk_json(cid, reply, created, None, piece=piece))}
            if event.content or event.thinking or event.logprobs:
                yield {"data": json_dumps(chunk_json(cid, reply, created, event, offset=offset))}
            for piece in after:
                yield {"data": json_dumps(chunk_json(cid, reply, created, None, piece=piece))}
                streaming = piece.index
            offset += len(event.content)
        elif isinstance(event, Done):
            finish = FINISH.get(event.reason, "stop")
            yield {"data": json_dumps(chunk_json(cid, reply, created, None, finish))}
            if reply.include_usage:
                yield {
                    "data": json_dumps(
                        {**_envelope(cid, reply, created, chunk=True), "choices": [], "usage": usage_json(event.usage)}
                    )
                }
            yield {"data": "[DONE]"}
        elif isinstance(event, Failed):
            yield error_frame(event.error)


def final(incoming: Incoming, call: Call, result: Collected) -> dict[str, Any]:
    reply: Reply = call.shape
    assert result.done is not None
    lps = result.logprobs
    out = {
        **_envelope(new_id("chatcmpl-" if reply.chat else "cmpl-"), reply, int(time.time()), chunk=False),
        "usage": usage_json(result.usage),
    }
    finish = FINISH.get(result.done.reason, "stop")
    if reply.chat:
        message: dict[str, Any] = {"role": "assistant", "content": result.content or None, "refusal": None}
        if result.thinking:
            message["reasoning_content"] = result.thinking
        if result.tool_calls:
            message["tool_calls"] = tool_calls_json(result.tool_calls)
        out["choices"] = [
            {"index": 0, "message": message, "logprobs": logprobs_json(lps, False), "finish_reason": finish}
        ]
    else:
        out["choices"] = [
            {
                "index": 0,
                "text": reply.echo + result.content,
                "logprobs": logprobs_json(lps, True, len(reply.echo)),
                "finish_reason": finish,
            }
        ]
    return out


# ---- errors and streams ------------------------------------------------------------------------------------------

# HTTP statuses Starlette itself raises (unknown route, wrong method) → OpenAI's error types.
_HTTP_TYPES = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def error_body(exc: MlxServerError) -> dict[str, Any]:
    if isinstance(exc, ContextTooLong):
        message = (
            f"This model's maximum context length is {exc.limit} tokens. However, your messages resulted in "
            f"{exc.tokens} tokens. Please reduce the length of the messages."
        )
        return {
            "error": {
                "message": message,
                "type": exc.openai_type,
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    code = "model_not_found" if isinstance(exc, ModelNotFound) else None
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": None, "code": code}}


def http_error_body(status: int, detail: str) -> dict[str, Any]:
    kind = _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": detail, "type": kind, "param": None, "code": None}}


def error_frame(exc: MlxServerError) -> bytes:
    # The openai SDK raises on a `data:` event whose object has "error"
    return ServerSentEvent(data=json_dumps(error_body(exc))).encode()


def stream_response(frames: AsyncIterator[Any]) -> Response:
    return EventSourceResponse(frames)
