"""Token ids → the text a client may see: detokenize, hold back partial UTF-8 and partial stop strings.

Runs on the inference thread, one OutputStream per sequence. Text is released only once it can no longer turn
out to be the start of a stop string, so a stop string is never emitted, even when split across tokens.
SequenceOutput then splits that text into content / thinking / tool calls (engine/prepare/parsers.py) and adds
per-token logprobs, producing the Delta events the runner publishes.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, cast

from mlx_server.contract.events import Delta, TokenLogprob
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.prepare.parsers import (
    OutputSplitter,
    Parts,
    request_tool_format,
    starts_in_thinking,
    think_markers,
)


class Detokenizer(Protocol):
    # The subset of mlx_lm's StreamingDetokenizer we rely on.
    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None: ...

    @property
    def last_segment(self) -> str: ...


class StopMatcher:
    """Finds stop strings in streamed text and withholds any tail that could still grow into one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: Optional[str] = None  # the stop string that ended the output (Anthropic reports it)

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            self.stopped = True
            self._held = ""
            return buf[:cut]
        hold = self._longest_partial(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _longest_partial(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class OutputStream:
    def __init__(self, detokenizer: Detokenizer, stops: Sequence[str] = ()) -> None:
        self._detok = detokenizer
        self._stops = StopMatcher(stops)
        self.text_len = 0

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def stop_sequence(self) -> Optional[str]:
        return self._stops.matched

    def add(self, token: int) -> str:
        self._detok.add_token(token)
        out = self._stops.feed(self._detok.last_segment)
        self.text_len += len(out)
        return out

    def finish(self) -> str:
        """Flush what the detokenizer and the stop matcher held back (end of generation)."""
        if self._stops.stopped:
            return ""
        self._detok.finalize()
        out = self._stops.feed(self._detok.last_segment) + self._stops.flush()
        self.text_len += len(out)
        return out


# ---- the whole per-sequence pipeline: text → stop strings → thinking / tool calls → Delta events ----------------


class LogprobReader:
    """Per-token logprob info from the step's normalized logprobs vector (after penalties and grammar masks)."""

    FLOOR = -9999.0  # JSON has no -inf; OpenAI clients expect a number

    def __init__(self, tokenizer: Any, top: int) -> None:
        self.tokenizer = tokenizer
        self.top = max(0, min(int(top), 20))

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def read(self, token: int, vec: Any) -> TokenLogprob:
        import mlx.core as mx  # deferred: the text-only parts of this module stay importable without MLX

        chosen = max(float(vec[token].item()), self.FLOOR)
        top: tuple[tuple[str, float], ...] = ()
        if self.top:
            k = min(self.top, vec.shape[-1])
            idx = mx.argpartition(-vec, kth=k - 1)[:k]
            ids, values = cast(list[int], idx.tolist()), cast(list[float], vec[idx].tolist())
            pairs = sorted(zip(ids, values, strict=True), key=lambda p: -p[1])
            top = tuple((self.text(i), float(v)) for i, v in pairs if v != float("-inf"))
        return TokenLogprob(self.text(token), chosen, top)


class SequenceOutput:
    """One sequence's output side: what the runner feeds token by token and turns into Delta events.

    Text, thinking and tool calls may be held back (partial stop strings, partial markers, an open tool call),
    so a Delta is produced only when something is visible; its `tokens` and `logprobs` cover every token since
    the previous Delta.
    """

    def __init__(
        self, request_id: int, stream: OutputStream, splitter: OutputSplitter, logprobs: Optional[LogprobReader] = None
    ) -> None:
        self.request_id = request_id
        self.stream = stream
        self.splitter = splitter
        self.logprobs = logprobs
        self._tokens = 0
        self._lps: list[TokenLogprob] = []

    @property
    def stopped(self) -> bool:
        return self.stream.stopped

    @property
    def made_tool_calls(self) -> bool:
        return self.splitter.made_tool_calls

    @property
    def stop_sequence(self) -> Optional[str]:
        return self.stream.stop_sequence

    def add(self, token: int, logprobs: Any = None, eos: bool = False) -> Optional[Delta]:
        """Feed one generated token (`eos`: the end-of-sequence token, which has no text)."""
        self._tokens += 1
        if eos:
            return None
        if self.logprobs is not None and logprobs is not None:
            self._lps.append(self.logprobs.read(token, logprobs))
        parts = self.splitter.feed(self.stream.add(token))
        if self.stream.stopped:
            parts += self.splitter.finish()
            return self._delta(parts, final=True)
        return self._delta(parts)

    def finish(self, pending: Optional[Delta] = None) -> Optional[Delta]:
        """End of generation (EOS or length): release everything held back, merged after `pending`."""
        parts = self.splitter.feed(self.stream.finish())
        parts += self.splitter.finish()
        delta = self._delta(parts, final=True)
        if pending is None or delta is None:
            return pending or delta
        return Delta(
            self.request_id,
            content=pending.content + delta.content,
            thinking=pending.thinking + delta.thinking,
            tool_calls=pending.tool_calls + delta.tool_calls,
            tool_call_deltas=pending.tool_call_deltas + delta.tool_call_deltas,
            tokens=pending.tokens + delta.tokens,
            logprobs=pending.logprobs + delta.logprobs,
        )

    def _delta(self, parts: Parts, final: bool = False) -> Optional[Delta]:
        if not parts and not (final and self._lps):
            return None
        delta = Delta(
            self.request_id,
            content=parts.content,
            thinking=parts.thinking,
            tool_calls=tuple(parts.tool_calls),
            tool_call_deltas=tuple(parts.tool_call_deltas),
            tokens=self._tokens,
            logprobs=tuple(self._lps),
        )
        self._tokens, self._lps = 0, []
        return delta


def make_output(req: GenerateRequest, tokenizer: Any, prompt: Sequence[int]) -> SequenceOutput:
    """The output pipeline for one request: its stop strings, the model's thinking and tool-call formats."""
    think = think_markers(tokenizer)
    # A grammar (format, forced tool call) owns the output from its first token, so it never starts in thinking.
    constrained = req.format is not None or req.force_tool is not None
    tail = tokenizer.decode(list(prompt[-16:])) if think and not constrained else ""
    splitter = OutputSplitter(
        think,
        in_thinking=starts_in_thinking(tail, think),
        tools=request_tool_format(req, tokenizer),
        tool_defs=req.tools,
        keep_thinking=req.think is not False,
    )
    reader = LogprobReader(tokenizer, req.top_logprobs) if req.logprobs else None
    return SequenceOutput(req.request_id, OutputStream(tokenizer.detokenizer, req.stop), splitter, reader)
