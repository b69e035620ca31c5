"""One error tree. Each error knows its HTTP status; each dialect maps it to its own body shape once."""

from __future__ import annotations


class MlxServerError(Exception):
    status: int = 500
    # OpenAI / Anthropic error "type" strings; the Ollama dialect only uses the message.
    openai_type: str = "server_error"
    anthropic_type: str = "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(MlxServerError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class Unauthorized(MlxServerError):
    status = 401
    openai_type = "authentication_error"
    anthropic_type = "authentication_error"


class Forbidden(MlxServerError):
    status = 403
    openai_type = "permission_error"
    anthropic_type = "permission_error"


class ModelNotFound(MlxServerError):
    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"

    def __init__(self, name: str, hint: str = "") -> None:
        message = f'model "{name}" not found'
        if hint:
            message = f"{message}, {hint}"
        super().__init__(message)
        self.name = name


class ContextTooLong(BadRequest):
    """A prompt that does not fit the context window, for a request that must not be cut (OpenAI, Anthropic, Ollama's
    `truncate: false`). Each dialect words it as its real API does; this message is Anthropic's."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"prompt is too long: {tokens} tokens > {limit} maximum")
        self.tokens = tokens
        self.limit = limit


class NotFound(MlxServerError):
    """Something other than a model that the request names and this server does not hold (a stored response)."""

    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"


class ModelBusy(MlxServerError):
    """The model has requests in flight, so it cannot be deleted now."""

    status = 409
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class ModelExists(MlxServerError):
    """A create or copy would replace a model models.yaml names."""

    status = 409


class PayloadTooLarge(MlxServerError):
    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"


class RateLimited(MlxServerError):
    status = 429
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"


class ModelLoadFailed(MlxServerError):
    """Weights are missing, corrupt or of an unsupported architecture; other models keep serving."""

    status = 500
    openai_type = "server_error"
    anthropic_type = "api_error"


class PullFailed(MlxServerError):
    """Downloading a model's weights failed (hub unreachable, offline, incomplete files)."""

    status = 500


class UpstreamUnavailable(MlxServerError):
    status = 502
    openai_type = "server_error"
    anthropic_type = "api_error"


class ServiceUnavailable(MlxServerError):
    """A designed refusal: full queue, memory budget, shutting down, or a dead inference thread."""

    status = 503
    openai_type = "server_error"
    anthropic_type = "overloaded_error"


class ServerBusy(ServiceUnavailable):
    def __init__(self, message: str = "server busy, retry later") -> None:
        super().__init__(message)


class InsufficientMemory(ServiceUnavailable):
    pass


class RequestTimeout(MlxServerError):
    status = 504
    openai_type = "timeout_error"
    anthropic_type = "api_error"


class InsufficientStorage(MlxServerError):
    """Not enough disk space to store what the request sends (an uploaded blob)."""

    status = 507


class InternalError(MlxServerError):
    status = 500
