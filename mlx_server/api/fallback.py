"""Transparent fallback to a real Ollama, as a pure ASGI middleware: no dialect handler knows it exists.

A model request (POST /api/chat, /v1/chat/completions, ...) naming a model that is not configured here is
forwarded to `server.fallback_url` and the upstream's answer is streamed back as it arrives. With
`server.fallback_when_busy`, a request we refuse with 503 (memory budget, full queue) goes there too. Listings
(/api/tags, /v1/models) show the upstream's models after ours. Every response carries `X-Served-By`.

It sits innermost among the user middleware (see `install`) so that auth, host and CORS checks run before
anything is proxied, while the dialects' own errors still pass through it and get tagged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware

from mlx_server.api.errors_shape import error_payload, stream_error
from mlx_server.api.routes import paths
from mlx_server.config.load import Config
from mlx_server.contract.errors import MlxServerError, PayloadTooLarge, UpstreamUnavailable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("mlx_server.fallback")

US, UPSTREAM = "mlx-server", "ollama"
MODEL_PATHS = paths(lambda e: e.names_model)  # POSTs naming a model: proxied when the model is not ours
LISTING_PATHS = paths(lambda e: e.listing)  # merged with the upstream's listing
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Credentials authenticate the client to us, not to the upstream; our origin policy already ran, and Ollama
# would refuse origins it wasn't told about; httpx sets host and length itself.
NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"x-api-key", b"cookie", b"origin"}
# uvicorn writes its own server and date headers; passing the upstream's would duplicate them.
NOT_RETURNED = HOP_BY_HOP | {b"server", b"date", b"x-served-by"}

CONNECT_TIMEOUT = 5.0
LISTING_TIMEOUT = 1.0  # a down upstream must never make our own listing slow
LISTING_TTL_OK = 10.0
LISTING_TTL_FAILED = 5.0


def install(app: Starlette, config: Config) -> None:
    """Add the middleware innermost, whatever order the other middleware was added in."""
    app.user_middleware.append(Middleware(FallbackMiddleware, config=config))


@dataclass
class _Exchange:
    """What one request's log line reports."""

    started: float
    served_by: str = US
    model: Optional[str] = None
    status: Optional[int] = None
    note: str = ""


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


def _json(obj: Any) -> bytes:
    # Starlette's JSONResponse encoding, so a merged listing looks like an unmerged one
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _with_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


def _tagging(send: Send, ex: _Exchange) -> Send:
    async def tagged(message: Message) -> None:
        if message["type"] == "http.response.start":
            ex.status = message["status"]
            message = {
                **message,
                "headers": _with_header(list(message.get("headers", [])), b"x-served-by", ex.served_by.encode()),
            }
        await send(message)

    return tagged


async def _send_all(messages: list[Message], send: Send) -> None:
    for message in messages:
        await send(message)


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
        self.url = server.fallback_url.rstrip("/") if server.fallback_url else None
        self.when_busy = server.fallback_when_busy
        self.max_body = server.max_body_bytes
        self.read_timeout = server.request_timeout  # None: a long non-streaming generation may take minutes
        self._client: Optional[httpx.AsyncClient] = None
        self._listings: dict[str, tuple[float, Optional[list[Any]]]] = {}  # path → (expires, models or None)
        self._listing_lock = asyncio.Lock()

    @property
    def client(self) -> httpx.AsyncClient:
        # Created on first use so its connections belong to the server's event loop.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=CONNECT_TIMEOUT, read=self.read_timeout, write=30.0, pool=None),
                trust_env=False,  # a proxy from the environment must not sit between us and a local Ollama
                follow_redirects=False,
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(started=time.perf_counter())
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
                ex.model or "-",
                ex.served_by,
                ex.status or "-",
                time.perf_counter() - ex.started,
                f" ({ex.note})" if ex.note else "",
            )

    def _closing(self, send: Send) -> Send:
        async def closing(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown") and self._client is not None:
                client, self._client = self._client, None
                await client.aclose()
            await send(message)

        return closing

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, ex: _Exchange) -> None:
        method, path = scope["method"], scope["path"]
        if self.url and method == "POST" and path in MODEL_PATHS:
            await self._model_request(scope, receive, send, ex)
        elif self.url and method == "GET" and path in LISTING_PATHS:
            await self._listing(scope, receive, send, ex)
        else:
            await self.app(scope, receive, _tagging(send, ex))

    # ---- model requests -----------------------------------------------------------------------------------

    async def _model_request(self, scope: Scope, receive: Receive, send: Send, ex: _Exchange) -> None:
        try:
            body = await self._read_body(scope, receive)
        except PayloadTooLarge as exc:
            await self._send_error(scope, send, ex, exc)
            return
        except _ClientGone:
            ex.note = "client disconnected"
            return
        ex.model = requested_model(scope["path"], body)
        if ex.model is not None and self.config.resolve(ex.model) is None:
            await self._proxy(scope, body, receive, send, ex, refusal=None)
            return
        if ex.model is None or not self.when_busy:
            await self.app(scope, _replay(body, receive), _tagging(send, ex))
            return
        refusal = await self._run_unless_refused(scope, body, receive, send, ex)
        if refusal is not None:
            ex.note = "refused here with 503"
            await self._proxy(scope, body, receive, send, ex, refusal=refusal)

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
        self, scope: Scope, body: bytes, receive: Receive, send: Send, ex: _Exchange
    ) -> Optional[list[Message]]:
        """Run the app; if it refuses with 503 (always before any body), keep that response instead of sending it
        and return it, so it can still be sent should the upstream be unreachable too."""
        tagged = _tagging(send, ex)
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

    async def _proxy(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, ex: _Exchange, refusal: Optional[list[Message]]
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    # Noticing the client leave lets us close the upstream connection, which stops its generation.
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    ex.note = "client disconnected"
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._relay(scope, body, send, ex, refusal)
                tg.cancel_scope.cancel()
        except Exception as exc:
            # anyio wraps even a single error in a group; the error handlers outside expect the error itself
            inner = getattr(exc, "exceptions", None)
            if inner and len(inner) == 1:
                raise inner[0] from None
            raise

    async def _relay(
        self, scope: Scope, body: bytes, send: Send, ex: _Exchange, refusal: Optional[list[Message]]
    ) -> None:
        query = scope.get("query_string", b"")
        url = f"{self.url}{scope['path']}" + (f"?{query.decode('latin-1')}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in NOT_FORWARDED]
        if not any(k.lower() == b"accept-encoding" for k, _ in headers):
            # httpx would otherwise ask for gzip, and the raw bytes we pass on would reach a client that didn't
            headers.append((b"accept-encoding", b"identity"))
        request = self.client.build_request(scope["method"], url, content=body, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("fallback %s unreachable for %s %s: %r", self.url, scope["method"], scope["path"], exc)
            if refusal is not None:
                ex.note = f"refused here with 503; fallback unreachable: {exc!r}"
                await _send_all(refusal, _tagging(send, ex))
                return
            await self._send_error(
                scope,
                send,
                ex,
                UpstreamUnavailable(
                    f'model "{ex.model}" is not served here and the fallback at {self.url} is unreachable'
                ),
            )
            return
        try:
            if refusal is not None and response.status_code >= 400:
                # The upstream can't serve it either (often: doesn't have the model); our refusal says why
                ex.note = f"refused here with 503; fallback answered {response.status_code}"
                await _send_all(refusal, _tagging(send, ex))
                return
            await self._stream_back(scope["path"], response, send, ex)
        finally:
            with anyio.CancelScope(shield=True):  # close even when the client left and we are being cancelled
                await response.aclose()

    async def _stream_back(self, path: str, response: httpx.Response, send: Send, ex: _Exchange) -> None:
        ex.served_by = UPSTREAM
        raw = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in NOT_RETURNED]
        await _tagging(send, ex)({"type": "http.response.start", "status": response.status_code, "headers": raw})
        sized = any(k == b"content-length" for k, _ in raw)
        ctype = response.headers.get("content-type", "")
        ndjson, sse = ctype.startswith("application/x-ndjson"), ctype.startswith("text/event-stream")
        last = b"\n\n"
        try:
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    last = chunk
        except httpx.HTTPError as exc:
            ex.note = f"upstream failed mid-stream: {exc!r}"
            log.warning("fallback %s failed mid-stream: %r", self.url, exc)
            if sized:
                return  # a sized body cannot be ended early; returning makes uvicorn drop the connection
            if ndjson or sse:
                # Clients raise on the dialect's error frame (an NDJSON line with "error", an SSE error event);
                # a stream cut short would look like a normal end. A partial line or event is ended first.
                frame = stream_error(
                    path, UpstreamUnavailable(f"the fallback at {self.url} failed mid-stream: {exc!r}")
                )
                ended = last.endswith((b"\n\n", b"\r\n\r\n")) if sse else last.endswith(b"\n")
                prefix = b"" if ended else b"\n\n" if sse else b"\n"
                await send({"type": "http.response.body", "body": prefix + frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_error(self, scope: Scope, send: Send, ex: _Exchange, exc: MlxServerError) -> None:
        body = _json(error_payload(scope["path"], exc))
        await _tagging(send, ex)(
            {
                "type": "http.response.start",
                "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ---- listings -----------------------------------------------------------------------------------------

    async def _listing(self, scope: Scope, receive: Receive, send: Send, ex: _Exchange) -> None:
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)  # a listing is small: buffering it costs nothing
        tagged = _tagging(send, ex)
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        merged = await self._merged(scope["path"], held) if start and start["status"] == 200 else None
        if start is None or merged is None:
            await _send_all(held, tagged)
            return
        headers = _with_header(list(start.get("headers", [])), b"content-length", str(len(merged)).encode())
        await tagged({**start, "headers": headers})
        await send({"type": "http.response.body", "body": merged, "more_body": False})

    async def _merged(self, path: str, held: list[Message]) -> Optional[bytes]:
        key, fields = ("models", ("name", "model")) if path == "/api/tags" else ("data", ("id",))
        try:
            ours = json.loads(b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body"))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(ours, dict) or not isinstance(ours.get(key), list):
            return None
        theirs = await self._upstream_listing(path, key)
        if not theirs:
            return None
        merged = merge_models(ours[key], theirs, fields, lambda n: self.config.resolve(n) is not None)
        return _json({**ours, key: merged})

    async def _upstream_listing(self, path: str, key: str) -> Optional[list[Any]]:
        """The upstream's models, cached (a failure too, so a down upstream costs one timeout per few seconds)."""
        async with self._listing_lock:
            expires, models = self._listings.get(path, (0.0, None))
            if time.monotonic() < expires:
                return models
            try:
                with anyio.fail_after(LISTING_TIMEOUT):
                    response = await self.client.get(f"{self.url}{path}")
                response.raise_for_status()
                models = response.json()[key]
                if not isinstance(models, list):
                    raise TypeError(f"{key} is not a list")
                ttl = LISTING_TTL_OK
            except (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                log.warning("fallback %s: cannot list models at %s (%r); listing ours only", self.url, path, exc)
                models, ttl = None, LISTING_TTL_FAILED
            self._listings[path] = (time.monotonic() + ttl, models)
            return models
