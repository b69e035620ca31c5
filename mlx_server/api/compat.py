"""Request-field checks and small translations shared by the OpenAI and Anthropic dialects.

Each check returns the value with its JSON type verified and range enforced, or raises a 400 that names the field,
so a client learns which field to fix.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from mlx_server.errors import BadRequest


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def number(body: dict[str, Any], key: str, lo: float, hi: float, default: Optional[float] = None
           ) -> Optional[float]:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"invalid value for field \"{key}\": expected a number")
    if not lo <= value <= hi:
        raise BadRequest(f"invalid value for field \"{key}\": must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def integer(body: dict[str, Any], key: str, lo: Optional[int] = None, hi: Optional[int] = None,
            default: Optional[int] = None) -> Optional[int]:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"invalid value for field \"{key}\": expected an integer")
    if lo is not None and value < lo:
        raise BadRequest(f"invalid value for field \"{key}\": must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise BadRequest(f"invalid value for field \"{key}\": must be <= {hi}, got {value}")
    return value


def boolean(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"invalid value for field \"{key}\": expected a boolean")
    return value


def stop_list(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise BadRequest(f"invalid value for field \"{key}\": expected a string or an array of strings")


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


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))




__all__ = ["arguments_object", "boolean", "integer", "json_dumps", "new_id", "number", "stop_list"]
