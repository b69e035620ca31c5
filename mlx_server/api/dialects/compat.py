"""Small translations shared by the OpenAI and Anthropic dialects.

Their fields' types and ranges are in api/dialects/bodies.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.events import Delta, ToolCallDelta


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def arguments_object(raw: Any, where: str) -> dict[str, Any]:
    """Tool-call arguments from history (a JSON string in OpenAI, an object elsewhere) as the object templates want."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            raise BadRequest(f"{where}: arguments must be a JSON object") from None
        if isinstance(value, dict):
            return value
    raise BadRequest(f"{where}: arguments must be a JSON object")


def effort_level(effort: Any) -> Optional[str]:
    """OpenAI's reasoning effort as a template's thinking level (gpt-oss takes low / medium / high); None for none."""
    if not isinstance(effort, str) or effort == "none":
        return None
    return {"minimal": "low", "xhigh": "high"}.get(effort, effort)


# Characters that JSON leaves raw but line readers split on: httpx's iter_lines (what the ollama client reads
# NDJSON with) splits like str.splitlines, at NEL and the Unicode line and paragraph separators too. Escaped, a
# streamed line stays one line; the text is the same. (Go's encoding/json, Ollama's, escapes U+2028 and U+2029.)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept, one line whatever splits lines (only string contents can hold these)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


def tool_pieces(delta: Delta, open_call: Optional[int]) -> tuple[list[ToolCallDelta], list[ToolCallDelta]]:
    """A delta's tool-call pieces split in the order they were written: those of the call already open (written
    before the delta's thinking and content), and the rest (calls that start in it, after its text)."""
    before = [p for p in delta.tool_call_deltas if p.index == open_call]
    return before, [p for p in delta.tool_call_deltas if p.index != open_call]


__all__ = ["arguments_object", "effort_level", "json_dumps", "new_id", "tool_pieces"]
