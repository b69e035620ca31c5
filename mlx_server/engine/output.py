"""Token ids → the text a client may see: detokenize, hold back partial UTF-8 and partial stop strings.

Runs on the inference thread, one OutputStream per sequence. Text is released only once it can no longer turn
out to be the start of a stop string, so a stop string is never emitted, even when split across tokens.
"""

from __future__ import annotations

from typing import Protocol, Sequence


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

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        hold = self._longest_partial(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
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
