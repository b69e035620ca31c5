"""One error, three body shapes: each dialect's clients parse only their own.

The path decides, through the dialect registry (api/routes.py): /v1/messages… is Anthropic, any other /v1/… is
OpenAI, everything else Ollama. The outer layers (host check, API key, rate limit, fallback) use this too.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from mlx_server.api.routes import dialect_for
from mlx_server.contract.errors import MlxServerError


def error_payload(path: str, exc: MlxServerError) -> dict[str, Any]:
    return dialect_for(path).error_body(exc)


def error_response(path: str, exc: MlxServerError) -> JSONResponse:
    return JSONResponse(error_payload(path, exc), status_code=exc.status)


def http_error_payload(path: str, status: int, detail: str) -> dict[str, Any]:
    """For Starlette's own HTTPExceptions (no route, wrong method), shaped like the dialect the path belongs to."""
    return dialect_for(path).http_error_body(status, detail)


def stream_error(path: str, exc: MlxServerError) -> bytes:
    """One frame of the path's stream format reporting `exc` (an NDJSON line, or an SSE error event)."""
    return dialect_for(path).error_frame(exc)


__all__ = ["error_payload", "error_response", "http_error_payload", "stream_error"]
