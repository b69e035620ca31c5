"""The app factory: everything the server holds is built here, per app, from one Config."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_server.api import admin, ollama
from mlx_server.api.common import AppContext, error_body
from mlx_server.config import Config
from mlx_server.errors import MlxServerError

log = logging.getLogger("mlx_server.api")


def create_app(config: Config, engine: Optional[Any] = None) -> Starlette:
    """Build the ASGI app. The engine (and with it MLX) is created here unless a test hands one in."""
    if engine is None:
        from mlx_server.engine.core import Engine  # the only place the API side pulls in the engine

        engine = Engine(config)
    ctx = AppContext(config=config, engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not engine.alive:
            engine.start()
        try:
            yield
        finally:
            engine.stop(timeout=config.server.shutdown_grace)

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MlxServerError)
        if exc.status >= 500:
            log.warning("%s %s → %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(error_body(exc), status_code=exc.status)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    app = Starlette(routes=[*admin.routes, *ollama.routes], lifespan=lifespan,
                    exception_handlers={MlxServerError: on_error, HTTPException: on_http})
    app.state.ctx = ctx
    return app
