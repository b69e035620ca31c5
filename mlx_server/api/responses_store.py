"""Stored /v1/responses: what `previous_response_id`, `GET /v1/responses/{id}` and `input_items` read.

Beyond Ollama, whose Responses route is stateless: OpenAI keeps a response (`store`, default true) so that the next
turn can name it instead of resending the conversation. A stored entry holds the response object as answered,
the input items it was given, and the whole conversation up to and including its output as chat messages, so a
continuation is that conversation plus the new input: the same prompt prefix as the turn before, which the
engine's prompt cache serves instead of prefilling again. Bounded by count, by bytes (of the JSON kept) and by
age, least recently used first; it lives in one app (built in create_app) and only the event loop touches it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mlx_server.contract.requests import ChatMessage


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as the client received it
    input_items: list[dict[str, Any]]  # this turn's input, as items with ids
    conversation: list[ChatMessage]  # every turn so far, this one's output included (instructions are not)
    stored_at: float
    size: int


def _size(response: dict[str, Any], items: list[dict[str, Any]], conversation: list[ChatMessage]) -> int:
    text = sum(len(m.content) + len(m.thinking or "") + sum(len(i) for i in m.images or ()) for m in conversation)
    return len(json.dumps(response)) + len(json.dumps(items)) + text


class ResponseStore:
    def __init__(self, count: int, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]], conversation: list[ChatMessage]) -> None:
        rid = str(response["id"])
        self.delete(rid)
        entry = StoredResponse(
            response, input_items, conversation, self.clock(), _size(response, input_items, conversation)
        )
        if self.count <= 0 or entry.size > self.max_bytes:
            return  # storing is off, or this one alone exceeds the cap: nothing older is dropped for it
        self._entries[rid] = entry
        self.bytes += entry.size
        while len(self._entries) > self.count or self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size

    def get(self, rid: str) -> Optional[StoredResponse]:
        entry = self._entries.get(rid)
        if entry is None:
            return None
        if self.clock() - entry.stored_at > self.ttl:
            self.delete(rid)
            return None
        self._entries.move_to_end(rid)
        return entry

    def delete(self, rid: str) -> bool:
        entry = self._entries.pop(rid, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True


__all__ = ["ResponseStore", "StoredResponse"]
