"""The Ollama dialect's replies: engine events back to Ollama JSON, one object or NDJSON lines.

ollama.py turns /api/generate and /api/chat into requests; this module shapes what the engine produced the way
Ollama's clients parse it: streaming NDJSON with nothing but one JSON object per line (`line`), errors as
`{"error": "..."}`, integer nanosecond durations, RFC 3339 times.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, AsyncIterator, Optional, Sequence

from starlette.responses import Response, StreamingResponse

from mlx_server.api.context import Collected, error_body, ns, rfc3339
from mlx_server.api.dialects.base import Call, Encode, Final, Incoming
from mlx_server.api.dialects.compat import json_dumps
from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Delta, Done, Event, Failed, TokenLogprob, Usage

# ---- replies ------------------------------------------------------------------------------------------------


def final_fields(reason: str, usage: Usage) -> dict[str, Any]:
    # Ollama reports a reply that made tool calls as a plain "stop".
    return {
        "done": True,
        "done_reason": "stop" if reason == "tool_calls" else reason,
        "total_duration": ns(usage.total_duration),
        "load_duration": ns(usage.load_duration),
        # the whole prompt, cached tokens included, as Ollama reports it (cache + evaluated)
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": ns(usage.prompt_eval_duration),
        "eval_count": usage.completion_tokens,
        "eval_duration": ns(usage.eval_duration),
    }


def _token(text: str, logprob: float) -> dict[str, Any]:
    # Ollama's api.TokenLogprob: `bytes` is omitted for an empty token (omitempty on a nil slice)
    entry: dict[str, Any] = {"token": text, "logprob": logprob}
    if text:
        entry["bytes"] = list(text.encode())
    return entry


def logprobs_json(lps: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Ollama's []api.Logprob: the chosen token, then `top_logprobs` only when alternatives were asked for."""
    out = []
    for lp in lps:
        entry = _token(lp.token, lp.logprob)
        if lp.top:
            entry["top_logprobs"] = [_token(t, v) for t, v in lp.top]
        out.append(entry)
    return out


def chunk(chat: bool, model: str, delta: Optional[Delta]) -> dict[str, Any]:
    base: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    content = delta.content if delta else ""
    thinking = delta.thinking if delta else ""
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if delta and delta.tool_calls:
            message["tool_calls"] = list(delta.tool_calls)
        base["message"] = message
    else:
        base["response"] = content
        base["text"] = content  # MLX-style clients read `text`; Ollama clients read `response`
        if thinking:
            base["thinking"] = thinking
    base["done"] = False
    if delta and delta.logprobs:  # beside `message` / `response`, not inside it, in both routes' replies
        base["logprobs"] = logprobs_json(delta.logprobs)
    return base


def line(obj: dict[str, Any]) -> bytes:
    return (json_dumps(obj) + "\n").encode()


def encoder(chat: bool) -> Encode:
    async def encode(incoming: Incoming, call: Call, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        """One NDJSON line per delta; an error after the start is one more line with `error`."""
        model = incoming.requested
        async for event in events:
            if isinstance(event, Delta):
                yield line(chunk(chat, model, event))
            elif isinstance(event, Done):
                yield line({**chunk(chat, model, None), **final_fields(event.reason, event.usage)})
            elif isinstance(event, Failed):
                yield error_frame(event.error)

    return encode


def final_for(chat: bool) -> Final:
    def final(incoming: Incoming, call: Call, result: Collected) -> dict[str, Any]:
        assert result.done is not None
        obj = chunk(
            chat,
            incoming.requested,
            Delta(
                0,
                content=result.content,
                thinking=result.thinking,
                tool_calls=tuple(result.tool_calls),
                logprobs=tuple(result.logprobs),
            ),
        )
        return {**obj, **final_fields(result.done.reason, result.usage)}

    return final


def http_error_body(status: int, detail: str) -> dict[str, Any]:
    return {"error": detail}


def error_frame(exc: MlxServerError) -> bytes:
    return line(error_body(exc))


def stream_response(frames: AsyncIterator[bytes]) -> Response:
    return StreamingResponse(frames, media_type="application/x-ndjson")
