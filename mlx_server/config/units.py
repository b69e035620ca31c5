"""The spellings models.yaml (and each API dialect, per request) accepts for durations and sizes."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from an Ollama keep_alive: a number (seconds) or a Go duration ("5m", "1h30m", "-1s").

    Negative means forever and is returned as -1.0 so callers need only one test.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # "300" is seconds, as Ollama accepts it
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION_PART.finditer(body):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos != len(body) or not body:
                raise ValueError(f'invalid duration {value!r} (use e.g. 300, "5m", "1h30m", -1)') from None
            seconds *= sign
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {value!r}")
    return -1.0 if seconds < 0 else seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def is_percentage(value: Any) -> bool:
    return isinstance(value, str) and value.strip().endswith("%")


def parse_size(value: Any, total: Optional[int] = None) -> int:
    """Bytes from 96GB / 512MiB / 1073741824, or a percentage of `total` ("75%")."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("size must not be negative")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {type(value).__name__}")
    text = value.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"invalid percentage {value!r}") from None
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100], got {value!r}")
        if total is None:
            raise ValueError("a percentage needs a total")
        return int(total * pct / 100)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {value!r} (use e.g. 96GB, 512MiB, 75%)")
    unit = (match.group(2) or "").lower().rstrip("b") if (match.group(2) or "").lower() != "b" else ""
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
