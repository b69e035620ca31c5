"""The Responses API's stream: typed SSE events with sequence numbers (the objects they carry are shaped in
responses_reply.py). It opens with `response.created` and `response.in_progress`, adds, fills and closes each
output item (`output_item.added` … `output_item.done`, a function call's arguments as `function_call_arguments`
deltas while they are generated), and ends with `response.completed`, `response.incomplete` or `response.failed`."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from sse_starlette.sse import ServerSentEvent

from mlx_server.api.dialects.base import Call, Incoming
from mlx_server.api.dialects.compat import json_dumps, new_id, tool_pieces
from mlx_server.api.dialects.responses_reply import (
    Output,
    Shape,
    call_name,
    message_item,
    reasoning_item,
    remember,
    response_object,
    status_of,
    text_part,
    usage_json,
)
from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Delta, Done, Event, Failed, ToolCallDelta


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
                part=text_part(""),
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
                    part=text_part(text),
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
            status = status_of(event.reason)
            response = response_object(
                shape, status, stream.items, usage_json(event.usage, stream.out.reasoning_tokens)
            )
            remember(incoming, shape, response, stream.out)
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


__all__ = ["Events", "encode", "error_frame"]
