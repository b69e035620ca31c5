"""Who may talk to the server: Host-header check, optional API key, and a cap on request bodies.

- Host check (DNS rebinding): while bound to loopback, only local names pass — localhost, 127.0.0.1, [::1] —
  plus any `*.internal` name (Docker's host.docker.internal) and `server.allowed_hosts`; others get 403.
  Bound elsewhere, `server.allowed_hosts` (when set) is the list; otherwise the API key is the gate.
- API key (`server.api_key` / MLX_SERVER_API_KEY): `Authorization: Bearer KEY` or `x-api-key: KEY` on every
  route but /health, compared in constant time.
- Bodies over `server.max_body_bytes` get 413, whether announced by Content-Length or streamed in chunks. Uploads
  (the registry's `upload` routes, POST /api/blobs/…) are capped at `server.max_blob_bytes` instead: they are
  streamed to disk by their handler, never held here, so only the count of bytes passing through is kept.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Collection, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.api.errors_shape import error_response
from mlx_server.config.load import ServerConfig
from mlx_server.contract.errors import Forbidden, MlxServerError, PayloadTooLarge, Unauthorized

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
OPEN_PATHS = {"/health"}


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a Host header, without port; IPv6 keeps its brackets off."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Security:
    def __init__(self, app: ASGIApp, server: ServerConfig, uploads: Collection[str] = ()) -> None:
        self.app = app
        self.uploads = tuple(uploads)  # path prefixes of upload routes
        self.max_upload = server.max_blob_bytes
        self.allowed = {h.lower() for h in server.allowed_hosts}
        self.loopback_only = is_loopback(server.host)
        self.key = server.api_key.encode() if server.api_key else None
        self.max_body = server.max_body_bytes

    def host_ok(self, host: str) -> bool:
        name = host_name(host)
        if name in self.allowed or f"[{name}]" in self.allowed:
            return True
        if self.loopback_only:
            return name in LOCAL_NAMES or is_loopback(name) or name.endswith(".internal")
        return not self.allowed  # bound elsewhere with no list: the API key (if any) decides

    def key_ok(self, headers: dict[bytes, bytes]) -> bool:
        if self.key is None:
            return True
        auth = headers.get(b"authorization", b"")
        offered: Optional[bytes] = None
        if auth[:7].lower() == b"bearer ":
            offered = auth[7:].strip()
        elif b"x-api-key" in headers:
            offered = headers[b"x-api-key"].strip()
        return offered is not None and hmac.compare_digest(offered, self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        refusal: Optional[MlxServerError] = None
        if not self.host_ok(headers.get(b"host", b"").decode("latin-1")):
            refusal = Forbidden("host not allowed (add it to server.allowed_hosts)")
        elif path not in OPEN_PATHS and scope.get("method") != "OPTIONS" and not self.key_ok(headers):
            refusal = Unauthorized("missing or invalid API key (send Authorization: Bearer KEY or x-api-key)")
        else:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self._limit(path):
                refusal = self._too_large(path)
        if refusal is not None:
            await error_response(path, refusal)(scope, receive, send)
            return
        await self.app(scope, self._capped(path, receive), send)

    def _limit(self, path: str) -> int:
        return self.max_upload if path.startswith(self.uploads) else self.max_body

    def _too_large(self, path: str) -> PayloadTooLarge:
        if path.startswith(self.uploads):
            return PayloadTooLarge(f"upload larger than the limit of {self.max_upload} bytes (server.max_blob_bytes)")
        return PayloadTooLarge(f"request body larger than the limit of {self.max_body} bytes")

    def _capped(self, path: str, receive: Receive) -> Receive:
        """A receive that stops a chunked body once it passes the cap (Content-Length was checked already)."""
        seen = 0
        limit = self._limit(path)

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(path)
            return message

        return capped
