"""The app factory: everything the server holds is built here, per app, from one Config."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.api import openapi
from mlx_server.api import routes as dialects
from mlx_server.api.catalog import Catalog
from mlx_server.api.context import AppContext
from mlx_server.api.errors_shape import error_response, http_error_payload
from mlx_server.api.limits import RateLimit
from mlx_server.api.metrics import Metrics
from mlx_server.api.responses_store import ResponseStore
from mlx_server.api.security import Security
from mlx_server.config.load import Config
from mlx_server.contract.errors import InternalError, MlxServerError
from mlx_server.contract.status import EngineClient
from mlx_server.models.blobs import BlobStore
from mlx_server.models.create import Workshop
from mlx_server.models.diagnose import ProblemCache
from mlx_server.models.registry import Registry

log = logging.getLogger("mlx_server.api")


class RequestMetrics:
    """Counts every HTTP request by route, resolved model and status, and makes sure every response says who
    served it (pure ASGI: streaming is untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-served-by" for k, _ in headers):
                    # Refusals from the outer layers (host, key, rate limit) were served here too.
                    message = {**message, "headers": [*headers, (b"x-served-by", b"mlx-server")]}
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(path, model, str(status)).inc()


LOCAL_ORIGINS = r"^(https?|app|tauri)://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"


def cors(config: Config) -> Middleware:
    """Browsers may call us from the configured origins, else from local pages only (as Ollama allows)."""
    origins = list(config.server.origins)
    return Middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_origin_regex=None if origins else LOCAL_ORIGINS,
        allow_methods=["*"],
        allow_headers=["*"],
    )


def create_app(config: Config, engine: EngineClient, catalog: Optional[Catalog] = None) -> Starlette:
    """Build the ASGI app around an engine (serve.py wires in the real one; route tests hand in a fake). The model
    catalog is created here unless a test hands one in."""
    metrics = Metrics(engine)
    engine.observe(metrics.observe)
    server = config.server
    blobs = BlobStore(server.cache_dir / "blobs", max_bytes=server.max_blob_bytes)
    registry = Registry(server.cache_dir, blob_path=blobs.path)
    config.attach_created(registry.models)  # every holder of the config now serves the created models too
    config_dir = config.path.parent if config.path else None
    ctx = AppContext(
        config=config,
        engine=engine,
        metrics=metrics,
        catalog=catalog or Catalog(config),
        blobs=blobs,
        workshop=Workshop(registry, blobs.path, server.cache_dir, config_dir),
        problems=ProblemCache(config),
        responses=ResponseStore(server.responses_store, server.responses_store_bytes, server.responses_ttl),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not engine.status().alive:
            engine.start()
        ctx.catalog.warm()  # in the background: the first /api/tags finds the GGUF headers already read
        try:
            yield
        finally:
            ctx.catalog.close()
            engine.stop(timeout=config.server.shutdown_grace)

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MlxServerError)
        # 4xx too: an operator must be able to tell from the log why a user's request was refused
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "%s %s → %d %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(request.url.path, exc)  # OpenAI / Anthropic / Ollama body by route prefix

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            http_error_payload(request.url.path, exc.status_code, exc.detail), status_code=exc.status_code
        )

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, InternalError(f"internal error: {type(exc).__name__}"))

    # Every route comes from the dialect registry; GET /openapi.json documents them all.
    app = Starlette(
        routes=[*dialects.routes(), *openapi.routes],
        lifespan=lifespan,
        exception_handlers={MlxServerError: on_error, HTTPException: on_http, Exception: on_bug},
        middleware=[
            Middleware(RequestMetrics, metrics=metrics),
            cors(config),
            Middleware(Security, server=config.server, uploads=dialects.upload_prefixes()),
            *(
                [
                    Middleware(
                        RateLimit,
                        per_minute=config.server.rate_limit_per_minute,
                        paths=dialects.paths(lambda e: e.rate_limited),
                    )
                ]
                if config.server.rate_limit_per_minute
                else []
            ),
        ],
    )
    app.state.ctx = ctx
    from mlx_server.api import fallback  # installed innermost, so every other middleware sees proxied requests

    fallback.install(app, config)
    return app
