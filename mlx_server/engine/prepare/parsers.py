"""Model output → content, thinking and tool calls, as a streaming state machine over detokenized text.

Markers (`<think>`, `</think>`, `<tool_call>`, …) may arrive split across tokens, so any tail that could still
grow into a marker is held back until it cannot. Text inside a tool-call block is never released as content:
the block is parsed when it closes (or when generation ends, for formats without an end marker) and comes out
as one tool call in the engine contract's Ollama shape `{"function": {"name", "arguments": {...}}}`. Meanwhile
the calls' pieces (name, then arguments as they are written, where the format allows: engine/prepare/toolstream.py)
come out as ToolCallDeltas for the dialects that stream calls.

Tool formats come from mlx_lm where it knows the model family (its TokenizerWrapper infers a parser from the chat
template: json_tools for Qwen2.5-style `<tool_call>{json}</tool_call>`, mistral for `[TOOL_CALLS]`, …). Llama 3
emits bare JSON `{"name": ..., "parameters": ...}` with no marker, which mlx_lm does not parse; that format is
recognised here from the template and handled as "the whole reply is one JSON value". A required call
(tool_choice required / a named tool) for a model with no JSON tool format is forced as generic JSON
`{"name": ..., "arguments": ...}` and read the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from mlx_server.contract.events import ToolCallDelta
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.prepare.toolstream import STREAMED_FORMATS, CallStreamer

log = logging.getLogger("mlx_server.engine.prepare.parsers")

ToolParser = Callable[[str, Any], Any]  # mlx_lm's signature: (text, tools) → dict | list[dict]


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls. `end` "" means the call runs to the end of the output."""

    name: str
    start: str
    end: str
    parse: ToolParser
    # Llama 3 style: no start marker; a reply that begins with "{" is taken as a candidate call.
    leading_json: bool = False


@dataclass
class Parts:
    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_call_deltas: list[ToolCallDelta] = field(default_factory=list)

    def __iadd__(self, other: "Parts") -> "Parts":
        self.content += other.content
        self.thinking += other.thinking
        self.tool_calls.extend(other.tool_calls)
        self.tool_call_deltas.extend(other.tool_call_deltas)
        return self

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls or self.tool_call_deltas)


# ---- tool call payloads -------------------------------------------------------------------------------------


def _as_call(obj: Any) -> Optional[dict[str, Any]]:
    """One parsed call in the contract's shape, or None when `obj` is not a call."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # already {"function": {...}} (some templates echo this shape)
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return {"function": {"name": name, "arguments": args}}


def normalize_calls(parsed: Any) -> list[dict[str, Any]]:
    """A parser's dict-or-list result → contract tool calls; ValueError if anything in it is not a call."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [_as_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        raise ValueError(f"not a tool call: {parsed!r}")
    return [c for c in calls if c is not None]


def parse_llama3_json(text: str, tools: Any = None) -> Any:
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, possibly several separated by `;` or newlines."""
    text = text.strip()
    if text.startswith("<|python_tag|>"):
        text = text[len("<|python_tag|>") :].strip()
    decoder = json.JSONDecoder()
    calls: list[Any] = []
    pos = 0
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)  # JSONDecodeError is a ValueError: not a call
        if not isinstance(obj, dict) or "name" not in obj or not ({"parameters", "arguments"} & obj.keys()):
            raise ValueError("JSON reply is not a tool call")
        calls.append(obj)
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    if not calls:
        raise ValueError("empty tool call")
    return calls if len(calls) > 1 else calls[0]


def template_text(tokenizer: Any) -> str:
    """The chat template's Jinja source ("" when there is none or it is code, not text)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), "")
    return template if isinstance(template, str) else ""


def tool_format_for(tokenizer: Any) -> Optional[ToolFormat]:
    """The model's tool-call format: mlx_lm's inferred parser, else Llama 3 JSON if the template says so."""
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
        parser = tokenizer.tool_parser
        name = getattr(parser, "__module__", "") or "mlx_lm"
        return ToolFormat(
            name=name.rsplit(".", 1)[-1],
            start=tokenizer.tool_call_start,
            end=tokenizer.tool_call_end or "",
            parse=parser,
        )
    template = template_text(tokenizer)
    if "<|start_header_id|>" in template and "ipython" in template and "parameters" in template:
        return ToolFormat(
            name="llama3_json", start="<|python_tag|>", end="", parse=parse_llama3_json, leading_json=True
        )
    return None


# A required call is forced with a grammar, which needs the call to be one JSON object. Models whose own format is
# that are forced in it; every other model (no known format, or a format that is not JSON) gets this one, which
# the grammar forces, the prompt describes (engine/prepare/prompt.py) and the splitter reads as "the whole reply
# is a call".
GENERIC_JSON = ToolFormat(name="generic_json", start="", end="", parse=parse_llama3_json, leading_json=True)
FORCEABLE_FORMATS = frozenset({"json_tools", "llama3_json", GENERIC_JSON.name})


def forced_tool_format(fmt: Optional[ToolFormat]) -> ToolFormat:
    """The format a required call is written in: the model's own when a grammar can force it, else generic JSON."""
    return fmt if fmt is not None and fmt.name in FORCEABLE_FORMATS else GENERIC_JSON


def function_defs(tools: Any, name: Optional[str] = None) -> list[dict[str, Any]]:
    """The function definitions of OpenAI-shape `tools` (`{"type": "function", "function": {...}}` or bare),
    only the one called `name` when it is given."""
    defs = [t.get("function", t) for t in (tools or []) if isinstance(t, dict)]
    return [d for d in defs if isinstance(d, dict) and (name is None or d.get("name") == name)]


def request_tool_format(req: GenerateRequest, tokenizer: Any) -> Optional[ToolFormat]:
    """The tool-call format to read this request's output in (None: no tools, everything is text)."""
    if not req.tools:
        return None
    fmt = tool_format_for(tokenizer)
    return forced_tool_format(fmt) if req.force_tool is not None else fmt


# ---- thinking -----------------------------------------------------------------------------------------------


def think_markers(tokenizer: Any) -> Optional[tuple[str, str]]:
    if getattr(tokenizer, "has_thinking", False) and tokenizer.think_start and tokenizer.think_end:
        return tokenizer.think_start, tokenizer.think_end
    return None


def starts_in_thinking(prompt_tail: str, markers: Optional[tuple[str, str]]) -> bool:
    """R1-style templates end the generation prompt with an open `<think>`: output then starts inside it."""
    if markers is None:
        return False
    start, end = markers
    return prompt_tail.rfind(start) > prompt_tail.rfind(end) if start in prompt_tail else False


# ---- the state machine ----------------------------------------------------------------------------------------


def _partial_suffix(buf: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of buf that is a proper prefix of some marker (so must be held back)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), best, -1):
            if buf.endswith(marker[:n]):
                best = n
                break
    return best


class OutputSplitter:
    """Splits streamed text into content / thinking / tool calls.

    `keep_thinking=False` (think: false) drops thinking text instead of returning it. Whitespace right after a
    closed thinking or tool block is dropped, as is trailing whitespace before `</think>`, so a client sees
    `thinking="…"`, `content="answer"` rather than the newlines that separate them in the raw output.
    """

    def __init__(
        self,
        think: Optional[tuple[str, str]] = None,
        *,
        in_thinking: bool = False,
        tools: Optional[ToolFormat] = None,
        tool_defs: Any = None,
        keep_thinking: bool = True,
    ) -> None:
        self.think = think
        self.tools = tools
        self.tool_defs = tool_defs
        self.keep_thinking = keep_thinking
        self.state = "thinking" if (in_thinking and think) else "content"
        self._buf = ""
        self._tool_text = ""
        self._strip = self.state == "thinking"  # drop leading whitespace of the next block
        self._at_start = True  # nothing visible released yet (Llama 3 JSON detection)
        self.made_tool_calls = False
        names = {d["name"] for d in function_defs(tool_defs) if isinstance(d.get("name"), str)}
        self._tool_names = frozenset(names) if names else None
        self._calls = self._streamer(0)  # the open tool block's reader

    def _streamer(self, first: Optional[int] = None) -> CallStreamer:
        """A reader for the next tool block; its calls are numbered on from the last block's."""
        streamed = self.tools is not None and self.tools.name in STREAMED_FORMATS
        start = self._calls.next_index if first is None else first
        return CallStreamer(start, self._tool_names, enabled=streamed)

    def _tool_text_add(self, text: str) -> Parts:
        self._tool_text += text
        return Parts(tool_call_deltas=self._calls.feed(text))

    # ---- public --------------------------------------------------------------------------------------------

    def feed(self, text: str) -> Parts:
        self._buf += text
        out = Parts()
        while self._buf:
            before = (self.state, len(self._buf))
            out += getattr(self, f"_in_{self.state}")(final=False)
            if (self.state, len(self._buf)) == before:
                break  # waiting for more text
        return out

    def finish(self) -> Parts:
        """End of generation: release what was held and parse an unterminated tool call."""
        out = Parts()
        for _ in range(8):  # each pass consumes the buffer or changes state; the bound guards against bugs
            if not self._buf and self.state != "tool":
                break
            out += getattr(self, f"_in_{self.state}")(final=True)
        return out

    # ---- states ----------------------------------------------------------------------------------------------

    def _starts(self) -> list[str]:
        starts = []
        if self.think:
            starts.append(self.think[0])
        if self.tools and self.tools.start:
            starts.append(self.tools.start)
        return starts

    def _in_content(self, final: bool) -> Parts:
        if self._strip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return Parts()
            self._strip = False
        if self._at_start and self.tools and self.tools.leading_json:
            head = self._buf.lstrip()
            if not head and not final:
                return Parts()  # only whitespace so far: a JSON call may still follow
            if head.startswith("{"):
                self.state, self._tool_text, self._buf = "tool", "", ""
                self._calls = self._streamer()
                return self._tool_text_add(head)
            self._at_start = False
        starts = self._starts()
        hits = [(i, m) for m in starts if (i := self._buf.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            text, self._buf = self._buf[:i], self._buf[i + len(marker) :]
            self._at_start = self._at_start and not text
            if self.think and marker == self.think[0]:
                self.state, self._strip = "thinking", True
            else:
                self.state, self._tool_text = "tool", ""
                self._calls = self._streamer()
            return Parts(content=text)
        hold = 0 if final else _partial_suffix(self._buf, starts)
        text, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
        if text:
            self._at_start = False
        return Parts(content=text)

    def _in_thinking(self, final: bool) -> Parts:
        assert self.think is not None
        if self._strip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return Parts()
            self._strip = False
        end = self.think[1]
        i = self._buf.find(end)
        if i >= 0:
            text, self._buf = self._buf[:i].rstrip(), self._buf[i + len(end) :]
            self.state, self._strip = "content", True
            return self._thought(text)
        if final:
            text, self._buf = self._buf, ""
            return self._thought(text)
        # Trailing whitespace may turn out to precede </think>, where it is dropped.
        partial = _partial_suffix(self._buf, [end])
        before = self._buf[: len(self._buf) - partial]
        hold = partial + len(before) - len(before.rstrip())
        text, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
        return self._thought(text)

    def _thought(self, text: str) -> Parts:
        return Parts(thinking=text) if self.keep_thinking else Parts()

    def _in_tool(self, final: bool) -> Parts:
        assert self.tools is not None
        end = self.tools.end
        if end:
            i = self._buf.find(end)
            if i >= 0:
                text, self._buf = self._buf[:i], self._buf[i + len(end) :]
                out = self._tool_text_add(text)
                out += self._close_tool(closed=True)
                return out
            hold = 0 if final else _partial_suffix(self._buf, [end])
            text, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
        else:
            text, self._buf = self._buf, ""
        out = self._tool_text_add(text)
        if final:
            out += self._close_tool(closed=False)
        return out

    def _close_tool(self, closed: bool) -> Parts:
        assert self.tools is not None
        text, self._tool_text = self._tool_text, ""
        self.state, self._strip, self._at_start = "content", True, False
        try:
            calls = normalize_calls(self.tools.parse(text, self.tool_defs))
        except Exception as exc:  # noqa: BLE001 - a malformed call is model output, not a server fault
            log.info("unparseable %s tool call, returned as text: %s", self.tools.name, exc)
            raw = text if self.tools.leading_json else f"{self.tools.start}{text}{self.tools.end if closed else ''}"
            return Parts(content=raw)  # pieces already sent stay an unfinished call (see ToolCallDelta)
        self.made_tool_calls = True
        return Parts(tool_calls=calls, tool_call_deltas=self._calls.finish(calls))


__all__ = [
    "FORCEABLE_FORMATS",
    "GENERIC_JSON",
    "OutputSplitter",
    "Parts",
    "ToolFormat",
    "forced_tool_format",
    "function_defs",
    "normalize_calls",
    "parse_llama3_json",
    "request_tool_format",
    "starts_in_thinking",
    "template_text",
    "think_markers",
    "tool_format_for",
]
