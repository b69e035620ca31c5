"""The fallback's transport: forward one request to the upstream Ollama and stream its answer back, fetch its listings.

fallback.py decides which requests go upstream (a model not configured here, a 503 refusal with
`server.fallback_when_busy`) and merges listings; this module only moves bytes: the headers that may cross, one
HTTP client per server, a client that leaves closing the upstream connection, the dialect's error frame when the
upstream breaks mid-stream, and a short-lived cache of the upstream's model lists.
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

from mlx_server.api.errors_shape import error_payload, stream_error
from mlx_server.contract.errors import MlxServerError, UpstreamUnavailable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# One logger for the whole fallback, so its log lines read (and filter) as one component's.
log = logging.getLogger("mlx_server.fallback")

US, UPSTREAM = "mlx-server", "ollama"
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


@dataclass
class Exchange:
    """What one request's log line reports."""

    started: float
    served_by: str = US
    model: Optional[str] = None
    status: Optional[int] = None
    note: str = ""


def json_bytes(obj: Any) -> bytes:
    # Starlette's JSONResponse encoding, so a merged listing looks like an unmerged one
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def with_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


def tagging(send: Send, ex: Exchange) -> Send:
    async def tagged(message: Message) -> None:
        if message["type"] == "http.response.start":
            ex.status = message["status"]
            message = {
                **message,
                "headers": with_header(list(message.get("headers", [])), b"x-served-by", ex.served_by.encode()),
            }
        await send(message)

    return tagged


async def send_all(messages: list[Message], send: Send) -> None:
    for message in messages:
        await send(message)


async def send_error(scope: Scope, send: Send, ex: Exchange, exc: MlxServerError) -> None:
    body = json_bytes(error_payload(scope["path"], exc))
    await tagging(send, ex)(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Upstream:
    """The Ollama at `server.fallback_url`, as the middleware reaches it."""

    def __init__(self, url: str, read_timeout: Optional[float]) -> None:
        self.url = url.rstrip("/")
        self.read_timeout = read_timeout  # None: a long non-streaming generation may take minutes
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

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def proxy(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, ex: Exchange, refusal: Optional[list[Message]]
    ) -> None:
        """Answer with the upstream's response; `refusal` (our held 503) is sent instead if the upstream fails."""
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
        self, scope: Scope, body: bytes, send: Send, ex: Exchange, refusal: Optional[list[Message]]
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
                await send_all(refusal, tagging(send, ex))
                return
            await send_error(
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
                await send_all(refusal, tagging(send, ex))
                return
            await self._stream_back(scope["path"], response, send, ex)
        finally:
            with anyio.CancelScope(shield=True):  # close even when the client left and we are being cancelled
                await response.aclose()

    async def _stream_back(self, path: str, response: httpx.Response, send: Send, ex: Exchange) -> None:
        ex.served_by = UPSTREAM
        raw = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in NOT_RETURNED]
        await tagging(send, ex)({"type": "http.response.start", "status": response.status_code, "headers": raw})
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

    async def listing(self, path: str, key: str) -> Optional[list[Any]]:
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
