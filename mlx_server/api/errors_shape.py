"""One error, three body shapes: each dialect's clients parse only their own.

The route prefix decides: /v1/messages… is Anthropic, any other /v1/… is OpenAI, everything else Ollama.
"""

from __future__ import annotations

from typing import Any, Literal

from starlette.responses import JSONResponse

from mlx_server.errors import MlxServerError, ModelNotFound

Dialect = Literal["openai", "anthropic", "ollama"]

# HTTP statuses Starlette itself raises (unknown route, wrong method) → each dialect's error type.
_OPENAI_HTTP = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}
_ANTHROPIC_HTTP = {404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def dialect_of(path: str) -> Dialect:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "ollama"


def openai_error(exc: MlxServerError) -> dict[str, Any]:
    code = "model_not_found" if isinstance(exc, ModelNotFound) else None
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": None, "code": code}}


def anthropic_error(exc: MlxServerError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": exc.anthropic_type, "message": exc.message}}


def error_payload(path: str, exc: MlxServerError) -> dict[str, Any]:
    dialect = dialect_of(path)
    if dialect == "openai":
        return openai_error(exc)
    if dialect == "anthropic":
        return anthropic_error(exc)
    return {"error": exc.message}


def error_response(path: str, exc: MlxServerError) -> JSONResponse:
    return JSONResponse(error_payload(path, exc), status_code=exc.status)


def http_error_payload(path: str, status: int, detail: str) -> dict[str, Any]:
    """For Starlette's own HTTPExceptions (no route, wrong method), shaped like the dialect the path belongs to."""
    dialect = dialect_of(path)
    if dialect == "openai":
        kind = _OPENAI_HTTP.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": detail, "type": kind, "param": None, "code": None}}
    if dialect == "anthropic":
        kind = _ANTHROPIC_HTTP.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": detail}}
    return {"error": detail}


__all__ = ["anthropic_error", "dialect_of", "error_payload", "error_response", "http_error_payload", "openai_error"]
