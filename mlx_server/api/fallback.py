"""Transparent fallback to a real Ollama, as a pure ASGI middleware: no dialect handler knows it exists.

A model request (POST /api/chat, /v1/chat/completions, ...) naming a model that is not configured here is
forwarded to `server.fallback_url` and the upstream's answer is streamed back as it arrives. With
`server.fallback_when_busy`, a request we refuse with 503 (memory budget, full queue) goes there too. Listings
(/api/tags, /v1/models) show the upstream's models after ours. Every response carries `X-Served-By`.

It sits innermost among the user middleware (see `install`) so that auth, host and CORS checks run before
anything is proxied, while the dialects' own errors still pass through it and get tagged. This module decides
what goes upstream; fallback_proxy.py carries it there and back.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional

from starlette.applications import Starlette
from starlette.middleware import Middleware

from mlx_server.api.fallback_proxy import (
    ASGIApp,
    Exchange,
    Message,
    Receive,
    Scope,
    Send,
    Upstream,
    json_bytes,
    log,
    send_all,
    send_error,
    tagging,
    with_header,
)
from mlx_server.api.routes import paths
from mlx_server.config.load import Config
from mlx_server.contract.errors import PayloadTooLarge

MODEL_PATHS = paths(lambda e: e.names_model)  # POSTs naming a model: proxied when the model is not ours
LISTING_PATHS = paths(lambda e: e.listing)  # merged with the upstream's listing


def install(app: Starlette, config: Config) -> None:
    """Add the middleware innermost, whatever order the other middleware was added in."""
    app.user_middleware.append(Middleware(FallbackMiddleware, config=config))


def requested_model(path: str, body: bytes) -> Optional[str]:
    """The model a request names, or None (bad JSON and MLX-style `category` requests are left to the app)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not model and path == "/api/show":
        model = data.get("name")
    return model if isinstance(model, str) and model else None


def merge_models(
    ours: list[Any], theirs: list[Any], fields: tuple[str, ...], served_here: Callable[[str], bool]
) -> list[Any]:
    """Ours, then the upstream's that are neither listed by us nor would resolve here (requests for those
    never reach the upstream, so listing them as its models would mislead)."""
    taken = {m.get(f) for m in ours if isinstance(m, dict) for f in fields}
    extra = []
    for m in theirs:
        if not isinstance(m, dict):
            continue
        names = [m[f] for f in fields if isinstance(m.get(f), str)]
        if names and not any(n in taken or served_here(n) for n in names):
            extra.append(m)
    return [*ours, *extra]


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the app the body we already read, then the real channel (the app polls it for disconnects)."""
    pending = [body]

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


class _ClientGone(Exception):
    pass


class FallbackMiddleware:
    def __init__(self, app: ASGIApp, config: Config) -> None:
        self.app = app
        self.config = config
        server = config.server
        self.upstream = Upstream(server.fallback_url, server.request_timeout) if server.fallback_url else None
        self.when_busy = server.fallback_when_busy
        self.max_body = server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = Exchange(started=time.perf_counter())
        try:
            await self._dispatch(scope, receive, send, ex)
        finally:
            path = scope["path"]
            quiet = path in ("/health", "/metrics") or (path == "/" and scope["method"] == "HEAD")
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s model=%s served_by=%s status=%s total=%.3fs%s",
                scope["method"],
                path,
                ex.model or scope.get("state", {}).get("model") or "-",  # the app notes the model it resolved
                ex.served_by,
                ex.status or "-",
                time.perf_counter() - ex.started,
                f" ({ex.note})" if ex.note else "",
            )

    def _closing(self, send: Send) -> Send:
        async def closing(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown") and self.upstream is not None:
                await self.upstream.aclose()
            await send(message)

        return closing

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        method, path = scope["method"], scope["path"]
        upstream = self.upstream
        if upstream and method == "POST" and path in MODEL_PATHS:
            await self._model_request(upstream, scope, receive, send, ex)
        elif upstream and method == "GET" and path in LISTING_PATHS:
            await self._listing(upstream, scope, receive, send, ex)
        else:
            await self.app(scope, receive, tagging(send, ex))

    # ---- model requests -----------------------------------------------------------------------------------

    async def _model_request(
        self, upstream: Upstream, scope: Scope, receive: Receive, send: Send, ex: Exchange
    ) -> None:
        try:
            body = await self._read_body(scope, receive)
        except PayloadTooLarge as exc:
            await send_error(scope, send, ex, exc)
            return
        except _ClientGone:
            ex.note = "client disconnected"
            return
        ex.model = requested_model(scope["path"], body)
        if ex.model is not None and self.config.resolve(ex.model) is None:
            await upstream.proxy(scope, body, receive, send, ex, refusal=None)
            return
        if ex.model is None or not self.when_busy:
            await self.app(scope, _replay(body, receive), tagging(send, ex))
            return
        refusal = await self._run_unless_refused(scope, body, receive, send, ex)
        if refusal is not None:
            ex.note = "refused here with 503"
            await upstream.proxy(scope, body, receive, send, ex, refusal=refusal)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        too_large = PayloadTooLarge(f"request body is larger than the limit of {self.max_body} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run_unless_refused(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, ex: Exchange
    ) -> Optional[list[Message]]:
        """Run the app; if it refuses with 503 (always before any body), keep that response instead of sending it
        and return it, so it can still be sent should the upstream be unreachable too."""
        tagged = tagging(send, ex)
        held: list[Message] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                held.append(message)
            elif held:
                held.append(message)
            else:
                await tagged(message)

        await self.app(scope, _replay(body, receive), watch)
        return held or None

    # ---- listings -----------------------------------------------------------------------------------------

    async def _listing(self, upstream: Upstream, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)  # a listing is small: buffering it costs nothing
        tagged = tagging(send, ex)
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        merged = await self._merged(upstream, scope["path"], held) if start and start["status"] == 200 else None
        if start is None or merged is None:
            await send_all(held, tagged)
            return
        headers = with_header(list(start.get("headers", [])), b"content-length", str(len(merged)).encode())
        await tagged({**start, "headers": headers})
        await send({"type": "http.response.body", "body": merged, "more_body": False})

    async def _merged(self, upstream: Upstream, path: str, held: list[Message]) -> Optional[bytes]:
        key, fields = ("models", ("name", "model")) if path == "/api/tags" else ("data", ("id",))
        try:
            ours = json.loads(b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body"))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(ours, dict) or not isinstance(ours.get(key), list):
            return None
        theirs = await upstream.listing(path, key)
        if not theirs:
            return None
        merged = merge_models(ours[key], theirs, fields, lambda n: self.config.resolve(n) is not None)
        return json_bytes({**ours, key: merged})
