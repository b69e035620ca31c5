"""The registry of dialects and routes, and the one skeleton every generation route runs.

Whatever needs a list of routes derives it from here: the app's routes, the rate limit's paths, the fallback's
proxied and merged paths, the error body shape of a path, and the OpenAPI document. Adding a route is adding an
`Endpoint` below; adding a generation route is writing its dialect's `Generation`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_server.api import admin, blobs, create
from mlx_server.api import manage as models
from mlx_server.api.context import Progress, begin, collect, ctx_of, follow, note_model, read_json, request_log
from mlx_server.api.dialects import anthropic, embeddings, ollama, openai, rerank, responses, responses_stream
from mlx_server.api.dialects.base import Call, Dialect, Endpoint, Generation, Handler, Incoming
from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.events import Usage

OLLAMA = Dialect(
    name="ollama",
    prefixes=("/",),
    error_body=ollama.error_body,
    http_error_body=ollama.http_error_body,
    error_frame=ollama.error_frame,
    stream_response=ollama.stream_response,
    error_schema="OllamaError",
    endpoints=(
        Endpoint("/", ("GET", "HEAD"), "Liveness text (JSON with Accept: application/json)", handler=ollama.root),
        Endpoint("/api/version", ("GET",), "Ollama version", handler=ollama.version),
        Endpoint("/api/tags", ("GET",), "Models on disk", handler=ollama.tags, listing=True),
        Endpoint("/api/ps", ("GET",), "Models in memory", handler=ollama.ps),
        Endpoint(
            "/api/show", ("POST",), "Model details", handler=ollama.show, schema="ModelReference", names_model=True
        ),
        Endpoint(
            "/api/pull",
            ("POST",),
            "Download a configured model",
            handler=models.pull,
            schema="ModelReference",
            streams=True,
        ),
        Endpoint(
            "/api/delete", ("DELETE",), "Delete a downloaded model", handler=models.delete, schema="ModelReference"
        ),
        Endpoint(
            "/api/create",
            ("POST",),
            "Create a model from another or from uploaded files",
            handler=create.create,
            schema="OllamaCreateRequest",
            streams=True,
        ),
        Endpoint("/api/copy", ("POST",), "Give a model another name", handler=create.copy, schema="OllamaCopyRequest"),
        Endpoint(
            "/api/blobs/{digest}", ("HEAD",), "Whether a blob is stored (200) or not (404)", handler=blobs.head_blob
        ),
        Endpoint(
            "/api/blobs/{digest}",
            ("POST",),
            "Upload a blob (raw bytes, verified against the sha256 digest in the path)",
            handler=blobs.create_blob,
            upload=True,
        ),
        Endpoint(
            "/api/generate",
            ("POST",),
            "Ollama completion (NDJSON stream by default)",
            generation=ollama.GENERATE,
            schema="OllamaGenerateRequest",
            names_model=True,
            rate_limited=True,
            streams=True,
        ),
        Endpoint(
            "/api/chat",
            ("POST",),
            "Ollama chat (NDJSON stream by default)",
            generation=ollama.CHAT,
            schema="OllamaChatRequest",
            names_model=True,
            rate_limited=True,
            streams=True,
        ),
        Endpoint(
            "/api/embed",
            ("POST",),
            "Embeddings of a text or texts (L2-normalized)",
            handler=embeddings.embed,
            schema="OllamaEmbedRequest",
            names_model=True,
            rate_limited=True,
        ),
        Endpoint(
            "/api/embeddings",
            ("POST",),
            "Legacy embeddings: one prompt",
            handler=embeddings.embeddings,
            schema="OllamaEmbeddingsRequest",
            names_model=True,
            rate_limited=True,
        ),
    ),
)

OPENAI = Dialect(
    name="openai",
    prefixes=("/v1/",),
    error_body=openai.error_body,
    http_error_body=openai.http_error_body,
    error_frame=openai.error_frame,
    stream_response=openai.stream_response,
    error_schema="OpenAIError",
    endpoints=(
        Endpoint("/v1/models", ("GET",), "OpenAI model list", handler=openai.list_models, listing=True),
        Endpoint("/v1/models/{model:path}", ("GET",), "One OpenAI model", handler=openai.get_model),
        Endpoint(
            "/v1/chat/completions",
            ("POST",),
            "OpenAI chat completion (SSE when stream)",
            generation=openai.CHAT,
            schema="ChatCompletionRequest",
            names_model=True,
            rate_limited=True,
            streams=True,
        ),
        Endpoint(
            "/v1/completions",
            ("POST",),
            "OpenAI text completion (SSE when stream)",
            generation=openai.COMPLETION,
            schema="CompletionRequest",
            names_model=True,
            rate_limited=True,
            streams=True,
        ),
        Endpoint(
            "/v1/embeddings",
            ("POST",),
            "OpenAI embeddings (float or base64)",
            handler=embeddings.openai_embeddings,
            schema="EmbeddingRequest",
            names_model=True,
            rate_limited=True,
        ),
    ),
)

ANTHROPIC = Dialect(
    name="anthropic",
    prefixes=("/v1/messages",),
    error_body=anthropic.error_body,
    http_error_body=anthropic.http_error_body,
    error_frame=anthropic.error_frame,
    stream_response=anthropic.stream_response,
    error_schema="AnthropicError",
    endpoints=(
        Endpoint(
            "/v1/messages",
            ("POST",),
            "Anthropic message (SSE when stream)",
            generation=anthropic.MESSAGES,
            schema="MessagesRequest",
            names_model=True,
            rate_limited=True,
            streams=True,
        ),
        Endpoint(
            "/v1/messages/count_tokens",
            ("POST",),
            "Anthropic token count",
            generation=anthropic.COUNT_TOKENS,
            schema="CountTokensRequest",
            rate_limited=True,
        ),
    ),
)

RESPONSES = Dialect(
    name="responses",
    prefixes=("/v1/responses",),
    error_body=openai.error_body,
    http_error_body=openai.http_error_body,
    error_frame=responses_stream.error_frame,
    stream_response=openai.stream_response,
    error_schema="OpenAIError",
    endpoints=(
        Endpoint(
            "/v1/responses",
            ("POST",),
            "OpenAI Responses API (SSE events when stream)",
            generation=responses.CREATE,
            schema="ResponsesRequest",
            names_model=True,
            rate_limited=True,
            streams=True,
        ),
        Endpoint("/v1/responses/{response_id}", ("GET",), "A stored response", handler=responses.retrieve),
        Endpoint("/v1/responses/{response_id}", ("DELETE",), "Delete a stored response", handler=responses.delete),
        Endpoint(
            "/v1/responses/{response_id}/input_items",
            ("GET",),
            "A stored response's input items",
            handler=responses.input_items,
        ),
    ),
)


def _rerank_endpoint(path: str, summary: str, handler: Handler) -> Endpoint:
    return Endpoint(
        path, ("POST",), summary, handler=handler, schema="RerankRequest", names_model=True, rate_limited=True
    )


# One body on four paths (api/dialects/rerank.py). Errors take the shape of the path's dialect: /v1/rerank
# OpenAI's, /api/rerank Ollama's; the bare /rerank and Cohere's /v2/rerank, which are no dialect's, this one's
# (OpenAI's).
RERANK = Dialect(
    name="rerank",
    prefixes=("/rerank", "/v2/rerank"),
    error_body=rerank.error_body,
    http_error_body=rerank.http_error_body,
    error_frame=openai.error_frame,
    stream_response=openai.stream_response,
    error_schema="OpenAIError",
    endpoints=(
        _rerank_endpoint(
            "/v1/rerank", "Rerank documents by relevance to a query (Jina / Cohere shape)", rerank.openai_rerank
        ),
        _rerank_endpoint("/rerank", "Rerank, as /v1/rerank", rerank.rerank),
        _rerank_endpoint("/v2/rerank", "Rerank, at Cohere's path", rerank.rerank),
        _rerank_endpoint("/api/rerank", "Rerank, with Ollama-style errors", rerank.ollama_rerank),
    ),
)

DIALECTS: tuple[Dialect, ...] = (OLLAMA, OPENAI, ANTHROPIC, RESPONSES, RERANK)

# Not a dialect's: the server's own routes (their errors take the shape of the path's dialect, Ollama's).
SERVER = (
    Endpoint("/health", ("GET", "HEAD"), "Health, queue and memory snapshot", handler=admin.health),
    Endpoint("/metrics", ("GET",), "Prometheus metrics", handler=admin.metrics),
    Endpoint("/queue/stats", ("GET",), "Queue counters", handler=admin.queue_stats),
)

ENDPOINTS: tuple[Endpoint, ...] = (*SERVER, *(e for d in DIALECTS for e in d.endpoints))


def dialect_for(path: str) -> Dialect:
    """The dialect whose prefix of `path` is longest: /v1/messages… Anthropic, other /v1/… OpenAI, else Ollama."""
    return max(DIALECTS, key=lambda d: d.owns(path))


def paths(where: Callable[[Endpoint], bool]) -> frozenset[str]:
    return frozenset(e.path for e in ENDPOINTS if where(e))


def upload_prefixes() -> tuple[str, ...]:
    """The path prefixes (up to their first parameter) of the routes whose bodies are uploads."""
    return tuple(sorted({e.path.split("{", 1)[0] for e in ENDPOINTS if e.upload}))


def routes() -> list[Route]:
    out = [Route(e.path, e.handler, methods=list(e.methods)) for e in SERVER if e.handler]
    for dialect in DIALECTS:
        for e in dialect.endpoints:
            handler = generation_route(dialect, e.generation) if e.generation else e.handler
            assert handler is not None, e.path
            out.append(Route(e.path, handler, methods=list(e.methods)))
    return out


# ---- the route skeleton -------------------------------------------------------------------------------------


def generation_route(dialect: Dialect, generation: Generation) -> Handler:
    """read body → resolve model → build request → submit → stream or collect → log, for every dialect."""

    async def handle(request: Request) -> Response:
        # Arrival, not the end of parsing: Ollama's total_duration and the time to first token start here.
        arrival, started_at = time.monotonic(), time.perf_counter()
        ctx = ctx_of(request)
        body = await read_json(request)
        requested, name = await generation.target(ctx, body)
        note_model(request, name)
        incoming = Incoming(ctx, request, body, requested, name, await ctx.info(name), arrival)
        call = generation.build(incoming)
        if call.needs_generation and not _generates(incoming):
            # Ollama's refusal; loading and unloading (empty requests) stay allowed, so preload warms any model.
            raise BadRequest(f'"{requested}" does not support {generation.verb}')
        events, first = await begin(request, call.request)
        response: Response
        if call.stream:
            logged = follow(events, first, dialect.name, requested, started_at)
            response = dialect.stream_response(_frames(generation, incoming, call, logged))
        else:
            status, progress = "disconnected", Progress(started_at)
            usage: Optional[Usage] = None
            try:
                result = await collect(events, request, first, progress)
                status, usage = "ok", result.usage
            except MlxServerError as exc:
                status = f"error: {exc.message}"
                raise
            finally:
                request_log(dialect.name, requested, status, usage or progress.usage(), started_at)
            response = JSONResponse(generation.final(incoming, call, result))
        response.headers.update(call.headers)
        return response

    return handle


def _generates(incoming: Incoming) -> bool:
    """False for an embedding-only model (what /api/show lists); unreadable files are left to the engine."""
    return incoming.info is None or "completion" in incoming.info.capabilities


async def _frames(
    generation: Generation, incoming: Incoming, call: Call, events: AsyncGenerator[Any, None]
) -> AsyncIterator[Any]:
    # Closing both at once, whatever ends the stream (its end, an error, the client leaving), cancels an
    # unfinished request in the engine and writes its log line now rather than when the generator is collected.
    async with (
        contextlib.aclosing(events) as logged,
        contextlib.aclosing(generation.encode(incoming, call, logged)) as frames,
    ):
        async for frame in frames:
            yield frame


__all__ = [
    "ANTHROPIC",
    "DIALECTS",
    "ENDPOINTS",
    "OLLAMA",
    "OPENAI",
    "RERANK",
    "RESPONSES",
    "SERVER",
    "dialect_for",
    "generation_route",
    "paths",
    "routes",
    "upload_prefixes",
]
