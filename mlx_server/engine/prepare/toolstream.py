"""A tool call's arguments while they are generated: the pieces streaming dialects send before the call is done.

Formats whose calls are JSON objects `{"name": ..., "arguments": {...}}` in the text (json_tools' `<tool_call>`
blocks, Llama 3 JSON with "parameters", the generic JSON of forced calls) are read character by character: once
the name is known and the arguments key follows, the call starts (a piece with its name), and the arguments
object then goes out as it is written, with the whitespace outside strings dropped, so the pieces joined are the
compact JSON the dialects write (`json.dumps(..., separators=(",", ":"))`) whenever the model writes its strings and
numbers plainly. Only calls to offered tools are started, so a JSON answer that merely has a "name" key does not
open a call.

The splitter still parses the whole block when it closes (parsers.py); `finish` then completes what could not be
streamed: a call whose arguments were not an object in the text (a JSON string, or the name after the arguments),
a list of calls, and every format that is not one JSON object per call (mistral `[TOOL_CALLS]`, the XML and
pythonic formats of mlx_lm's other parsers) come out as one piece with the whole arguments at completion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from mlx_server.contract.events import ToolCallDelta

log = logging.getLogger("mlx_server.engine.prepare.toolstream")

ARGUMENT_KEYS = ("arguments", "parameters")
STREAMED_FORMATS = frozenset({"json_tools", "llama3_json", "generic_json"})


def compact_json(value: Any) -> str:
    """JSON as every dialect writes a call's arguments."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass
class _Call:
    """One top-level JSON object of the block, as far as it has been read."""

    name: Optional[str] = None
    index: Optional[int] = None  # set when the call has started (its name went out)
    arguments_next: bool = False  # the arguments key has been read; its value follows
    arguments: str = ""  # the arguments text sent so far
    complete: bool = False  # the arguments object has closed


class CallStreamer:
    """Reads one tool-call block's text as it grows; `feed` returns the pieces it makes readable."""

    def __init__(self, first_index: int, names: Optional[frozenset[str]] = None, enabled: bool = True) -> None:
        self.next_index = first_index
        self.names = names  # offered tool names (None: any)
        self.enabled = enabled
        self.calls: list[_Call] = []
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string = ""  # the raw text of a key or value string at depth 1
        self._expect = ""  # at depth 1 of an object: "key", "value", or "" (after a value)
        self._key: Optional[str] = None
        self._object = False  # the current top-level value is an object
        self._capture: Optional[_Call] = None  # the call whose arguments object is being read
        self._out: list[ToolCallDelta] = []
        self._piece = ""

    # ---- public --------------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[ToolCallDelta]:
        if not self.enabled:
            return []
        for c in text:
            if self._capture is not None:
                self._in_arguments(c, self._capture)
            else:
                self._outside(c)
        self._flush()
        out, self._out = self._out, []
        return out

    def finish(self, calls: list[dict[str, Any]]) -> list[ToolCallDelta]:
        """The block parsed as `calls`: the pieces still owed for them (every call ends with its arguments)."""
        self._flush()
        out, self._out = self._out, []
        objects: list[Optional[_Call]] = list(self.calls)
        if len(objects) != len(calls):  # e.g. a JSON list of calls: not read as objects, so nothing was started
            objects = [None] * len(calls)
        for call, obj in zip(calls, objects, strict=True):
            fn = call["function"]
            if obj is None or obj.index is None:
                out.append(ToolCallDelta(self._take_index(), name=fn["name"], arguments=compact_json(fn["arguments"])))
            elif not obj.arguments:
                out.append(ToolCallDelta(obj.index, arguments=compact_json(fn["arguments"])))
            elif not obj.complete or obj.name != fn["name"] or _loads(obj.arguments) != fn["arguments"]:
                log.warning("streamed %r arguments differ from the parsed call (duplicate keys?)", fn["name"])
        return out

    # ---- the reader ----------------------------------------------------------------------------------------

    def _take_index(self) -> int:
        index, self.next_index = self.next_index, self.next_index + 1
        return index

    def _string_char(self, c: str) -> bool:
        """One character inside a JSON string: escapes tracked; True when it closes the string."""
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif c == '"':
            self._in_string = False
            return True
        return False

    def _in_arguments(self, c: str, call: _Call) -> None:
        if self._in_string:
            self._string_char(c)
        elif c.isspace():
            return
        elif c == '"':
            self._in_string = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
        self._piece += c
        call.arguments += c
        if self._depth == 1:  # the arguments object closed
            call.complete, self._capture, self._expect = True, None, ""
            self._flush()

    def _outside(self, c: str) -> None:
        top = self._depth == 1 and self._object
        if self._in_string:
            if top:
                self._string += c
            if self._string_char(c) and top:
                self._string_read(self._string)
            return
        if c == '"':
            self._in_string, self._string = True, c
        elif c in "{[":
            if self._depth == 0:
                self._object = c == "{"
                if self._object:
                    self.calls.append(_Call())
                    self._expect, self._key = "key", None
            elif top and c == "{" and self._expect == "value" and self._key in ARGUMENT_KEYS:
                self._arguments_open(self.calls[-1], c)
            self._depth += 1
        elif c in "}]":
            self._depth = max(0, self._depth - 1)
        elif top and c == ":":
            self._expect = "value"
            call = self.calls[-1]
            if self._key in ARGUMENT_KEYS and not call.arguments:
                call.arguments_next = True
                self._start(call)
        elif top and c == ",":
            self._expect, self._key = "key", None

    def _string_read(self, raw: str) -> None:
        value = _loads(raw)
        if self._expect == "key":
            self._key = value if isinstance(value, str) else None
        elif self._expect == "value":
            call = self.calls[-1]
            if self._key == "name" and isinstance(value, str) and call.name is None:
                call.name = value
                self._start(call)
            self._expect = ""

    def _start(self, call: _Call) -> None:
        """Start the call once its name is known and its arguments follow (and it calls an offered tool)."""
        if call.index is not None or call.name is None or not call.arguments_next:
            return
        if self.names is not None and call.name not in self.names:
            return
        call.index = self._take_index()
        self._out.append(ToolCallDelta(call.index, name=call.name))

    def _arguments_open(self, call: _Call, c: str) -> None:
        if call.index is None or call.arguments:
            return  # not started (or a second arguments key): completed from the parsed call instead
        self._capture = call
        self._piece += c
        call.arguments += c

    def _flush(self) -> None:
        call = self._capture or (self.calls[-1] if self.calls else None)
        if self._piece and call is not None and call.index is not None:
            self._out.append(ToolCallDelta(call.index, arguments=self._piece))
        self._piece = ""


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


__all__ = ["STREAMED_FORMATS", "CallStreamer", "compact_json"]
