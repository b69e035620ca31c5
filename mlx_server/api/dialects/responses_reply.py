"""The Responses API's replies: the response object and its output items (the stream of events that carries them
is responses_stream.py's).

Output items come in the order the model produced them: a `reasoning` item (its text as `content`, as the summary
when the request asked for one, and as `encrypted_content` when `include` names it: unencrypted, as Ollama does,
so the client can send it back as the model's earlier thinking), a `message` with one `output_text` part, and a
`function_call` per tool call. The status is `completed`, or `incomplete` when the token budget ran out, or
`failed`. A finished response is stored (api/responses_store.py) unless the request said `store: false`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx_server.api.context import Collected
from mlx_server.api.dialects.base import Call, Incoming
from mlx_server.api.dialects.compat import json_dumps, new_id
from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Usage
from mlx_server.contract.requests import ChatMessage

ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "previous_response_id")


@dataclass
class Shape:
    """What the reply needs of the request (call.shape)."""

    id: str
    created_at: int
    requested: str
    body: dict[str, Any]
    stream: bool
    store: bool
    summary: bool  # reasoning.summary was set: the thinking is also the reasoning item's summary
    encrypted: bool  # include names reasoning.encrypted_content
    input_items: list[dict[str, Any]]
    conversation: list[ChatMessage]  # before this turn's output
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Output:
    """The turn's output so far, in order."""

    thinking: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # the engine's tool calls, as parsed
    reasoning_tokens: int = 0


def usage_json(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def reasoning_item(shape: Shape, item_id: str, text: str, done: bool = True) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": item_id,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": text}] if shape.summary and done else [],
        "content": [{"type": "reasoning_text", "text": text}] if done else [],
    }
    if shape.encrypted and done:
        item["encrypted_content"] = text
    return item


def message_item(item_id: str, text: str, done: bool = True) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [text_part(text)] if done else [],
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_name(name: str) -> dict[str, str]:
    """A call's `name`, and its `namespace` when it is a namespace member's: the model is offered those as
    `namespace.member` (function names cannot hold a dot), and Codex routes a call by the two fields."""
    namespace, dot, member = name.rpartition(".")
    return {"name": member, "namespace": namespace} if dot and namespace and member else {"name": name}


def call_item(call: dict[str, Any], item_id: str) -> dict[str, Any]:
    fn = call["function"]
    return {
        "id": item_id,
        "type": "function_call",
        "status": "completed",
        "call_id": call.get("id") or new_id("call_"),
        **call_name(fn["name"]),
        "arguments": json_dumps(fn.get("arguments") or {}),
    }


def response_object(
    shape: Shape,
    status: str,
    output: list[dict[str, Any]],
    usage: Optional[dict[str, Any]] = None,
    error: Optional[MlxServerError] = None,
) -> dict[str, Any]:
    body = shape.body
    text: dict[str, Any] = body["text"] if isinstance(body.get("text"), dict) else {}
    reasoning: dict[str, Any] = body["reasoning"] if isinstance(body.get("reasoning"), dict) else {}
    out: dict[str, Any] = {
        "id": shape.id,
        "object": "response",
        "created_at": shape.created_at,
        "status": status,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
        "error": {"code": "server_error", "message": error.message} if error is not None else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": shape.requested,
        "output": output,
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "text": {"format": text.get("format") or {"type": "text"}},
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "temperature": shape.temperature,
        "top_p": shape.top_p,
        "truncation": body.get("truncation") or "disabled",
        "store": shape.store,
        "background": False,
        "service_tier": "default",
        "prompt_cache_key": body.get("prompt_cache_key"),
        "user": body.get("user"),
        "usage": usage,
    }
    for key in ECHOED:
        out[key] = body.get(key)
    out["parallel_tool_calls"] = body.get("parallel_tool_calls") is not False
    out["metadata"] = body.get("metadata") or {}
    return out


def status_of(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


def remember(incoming: Incoming, shape: Shape, response: dict[str, Any], out: Output) -> None:
    """Keep a finished response and its conversation for previous_response_id (unless store is false)."""
    if not shape.store or incoming.ctx.responses is None:
        return
    calls = [{"id": c.get("id"), "type": "function", "function": c["function"]} for c in out.calls]
    turn = ChatMessage("assistant", out.content, thinking=out.thinking or None, tool_calls=calls or None)
    # Calls carry the ids the client saw, so its function_call_output items match them on the next turn.
    for item, call in zip((i for i in response["output"] if i["type"] == "function_call"), calls, strict=False):
        call["id"] = call["id"] or item["call_id"]  # streamed calls already carry theirs
    incoming.ctx.responses.put(response, shape.input_items, [*shape.conversation, turn])


# ---- whole ----------------------------------------------------------------------------------------------------


def _output_items(shape: Shape, out: Output) -> list[dict[str, Any]]:
    items = []
    if out.thinking:
        items.append(reasoning_item(shape, new_id("rs_"), out.thinking))
    if out.content:
        items.append(message_item(new_id("msg_"), out.content))
    items.extend(call_item(c, new_id("fc_")) for c in out.calls)
    return items


def final(incoming: Incoming, call: Call, result: Collected) -> dict[str, Any]:
    shape: Shape = call.shape
    assert result.done is not None
    out = Output(result.thinking, result.content, list(result.tool_calls), result.thinking_tokens)
    response = response_object(
        shape,
        status_of(result.done.reason),
        _output_items(shape, out),
        usage_json(result.usage, out.reasoning_tokens),
    )
    remember(incoming, shape, response, out)
    return response


__all__ = [
    "Output",
    "Shape",
    "call_item",
    "call_name",
    "final",
    "message_item",
    "reasoning_item",
    "remember",
    "response_object",
    "status_of",
    "text_part",
    "usage_json",
]
