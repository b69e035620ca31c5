"""The Responses API's replies: the response object, and its stream of typed SSE events with sequence numbers.

Output items come in the order the model produced them: a `reasoning` item (its text as `content`, as the summary
when the request asked for one, and as `encrypted_content` when `include` names it: unencrypted, as Ollama does,
so the client can send it back as the model's earlier thinking), a `message` with one `output_text` part, and a
`function_call` per tool call. A stream opens with `response.created` and `response.in_progress`, adds, fills and
closes each item (`output_item.added` … `output_item.done`), and ends with `response.completed`, or
`response.incomplete` when the token budget ran out, or `response.failed`. A finished response is stored (api/
responses_store.py) unless the request said `store: false`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from sse_starlette.sse import ServerSentEvent

from mlx_server.api.context import Collected
from mlx_server.api.dialects.base import Call, Incoming
from mlx_server.api.dialects.compat import json_dumps, new_id, tool_pieces
from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Delta, Done, Event, Failed, ToolCallDelta, Usage
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
        "content": [_text_part(text)] if done else [],
    }


def _text_part(text: str) -> dict[str, Any]:
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


def _status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


def _remember(incoming: Incoming, shape: Shape, response: dict[str, Any], out: Output) -> None:
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
        _status(result.done.reason),
        _output_items(shape, out),
        usage_json(result.usage, out.reasoning_tokens),
    )
    _remember(incoming, shape, response, out)
    return response


# ---- streamed -------------------------------------------------------------------------------------------------


class Events:
    """The stream's event sequence: numbers every event and tracks which output item is open."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # finished items, in output order
        self.open: Optional[str] = None  # "reasoning", "message" or "function_call"
        self.open_id = ""
        self.call: Optional[int] = None  # the open function_call's call (ToolCallDelta.index)
        self.call_item: dict[str, Any] = {}
        self.call_name = ""  # the open call's name as the model wrote it (namespace-qualified)
        self.out = Output()

    def event(self, kind: str, **data: Any) -> dict[str, str]:
        frame = {"event": kind, "data": json_dumps({"type": kind, "sequence_number": self.sequence, **data})}
        self.sequence += 1
        return frame

    @property
    def index(self) -> int:
        return len(self.items)

    def start(self) -> list[dict[str, str]]:
        snapshot = response_object(self.shape, "in_progress", [])
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def thinking(self, text: str, tokens: int) -> list[dict[str, str]]:
        frames = [] if self.open == "reasoning" else [*self.close(), *self._open("reasoning", "rs_")]
        self.out.thinking += text
        self.out.reasoning_tokens += tokens
        kind = "response.reasoning_summary_text.delta" if self.shape.summary else "response.reasoning_text.delta"
        where = {"summary_index": 0} if self.shape.summary else {"content_index": 0}
        frames.append(self.event(kind, item_id=self.open_id, output_index=self.index, delta=text, **where))
        return frames

    def content(self, text: str) -> list[dict[str, str]]:
        frames = [] if self.open == "message" else [*self.close(), *self._open("message", "msg_")]
        self.out.content += text
        frames.append(
            self.event(
                "response.output_text.delta",
                item_id=self.open_id,
                output_index=self.index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return frames

    def piece(self, piece: ToolCallDelta) -> list[dict[str, str]]:
        """A function_call item opens on its call's first piece (name and call_id, arguments ""), and each piece
        of the arguments is one arguments.delta; the item is done when anything else starts."""
        frames = []
        if self.open != "function_call" or self.call != piece.index:
            frames = self.close()
            self.open, self.open_id, self.call = "function_call", new_id("fc_"), piece.index
            self.call_item = {
                "id": self.open_id,
                "type": "function_call",
                "status": "in_progress",
                "call_id": new_id("call_"),
                **call_name(piece.name),
                "arguments": "",
            }
            self.call_name = piece.name
            frames.append(self.event("response.output_item.added", output_index=self.index, item=self.call_item))
        if piece.arguments:
            self.call_item["arguments"] += piece.arguments
            frames.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=self.open_id,
                    output_index=self.index,
                    delta=piece.arguments,
                )
            )
        return frames

    def _close_call(self) -> list[dict[str, str]]:
        item, index = self.call_item, self.index
        arguments = _loads(item["arguments"])
        done = {**item, "status": "completed" if isinstance(arguments, dict) else "incomplete"}
        if isinstance(arguments, dict):  # an unfinished call (cut off by the token budget) is not part of the turn
            call = {"name": self.call_name, "arguments": arguments}
            self.out.calls.append({"id": item["call_id"], "function": call})
        self.items.append(done)
        self.open, self.call = None, None
        return [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self.event("response.output_item.done", output_index=index, item=done),
        ]

    def _open(self, kind: str, prefix: str) -> list[dict[str, str]]:
        self.open, self.open_id = kind, new_id(prefix)
        if kind == "reasoning":
            item = reasoning_item(self.shape, self.open_id, "", done=False)
            return [self.event("response.output_item.added", output_index=self.index, item=item)]
        return [
            self.event(
                "response.output_item.added", output_index=self.index, item=message_item(self.open_id, "", False)
            ),
            self.event(
                "response.content_part.added",
                item_id=self.open_id,
                output_index=self.index,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def close(self) -> list[dict[str, str]]:
        """Finish the open reasoning or message item, if any."""
        if self.open is None:
            return []
        if self.open == "function_call":
            return self._close_call()
        index, item_id = self.index, self.open_id
        frames = []
        if self.open == "reasoning":
            text = self.out.thinking
            if self.shape.summary:
                frames.append(
                    self.event(
                        "response.reasoning_summary_text.done",
                        item_id=item_id,
                        output_index=index,
                        summary_index=0,
                        text=text,
                    )
                )
            else:
                frames.append(
                    self.event(
                        "response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0, text=text
                    )
                )
            item = reasoning_item(self.shape, item_id, text)
        else:
            text = self.out.content
            frames += [
                self.event(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self.event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part=_text_part(text),
                ),
            ]
            item = message_item(item_id, text)
        frames.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        self.open = None
        return frames


async def encode(incoming: Incoming, call: Call, events: AsyncIterator[Event]) -> AsyncGenerator[Any, None]:
    shape: Shape = call.shape
    stream = Events(shape)
    for frame in stream.start():
        yield frame
    async for event in events:
        frames: list[dict[str, str]] = []
        if isinstance(event, Delta):
            # Calls stream from their pieces (the whole calls in event.tool_calls are the same calls).
            before, after = tool_pieces(event, stream.call)
            for piece in before:
                frames += stream.piece(piece)
            if event.thinking:
                frames += stream.thinking(event.thinking, 0 if event.content else event.tokens)
            if event.content:
                frames += stream.content(event.content)
            for piece in after:
                frames += stream.piece(piece)
        elif isinstance(event, Done):
            frames += stream.close()
            status = _status(event.reason)
            response = response_object(
                shape, status, stream.items, usage_json(event.usage, stream.out.reasoning_tokens)
            )
            _remember(incoming, shape, response, stream.out)
            frames.append(stream.event(f"response.{status}", response=response))
        elif isinstance(event, Failed):
            frames += stream.close()
            response = response_object(shape, "failed", stream.items, error=event.error)
            frames.append(stream.event("response.failed", response=response))
        for frame in frames:
            yield frame


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def error_frame(exc: MlxServerError) -> bytes:
    """An error once the stream has begun: the Responses API's `error` event."""
    data = {"type": "error", "code": exc.openai_type, "message": exc.message, "param": None, "sequence_number": 0}
    return ServerSentEvent(event="error", data=json_dumps(data)).encode()


__all__ = ["Shape", "encode", "error_frame", "final", "response_object"]
