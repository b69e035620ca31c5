"""Optional per-client rate limit, for the routes that cost engine work (the registry's `rate_limited` ones).

Many containers share one source address, so listings and health (`/health`, `/api/tags`, `/api/ps`,
`/api/version`, `/`) are never limited: a limit there would make a busy host look dead.
"""

from __future__ import annotations

import time
from typing import Callable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_server.api.errors_shape import error_response
from mlx_server.contract.errors import RateLimited


class RateLimit:
    """A token bucket per client address: `per_minute` requests, refilled continuously."""

    def __init__(
        self, app: ASGIApp, per_minute: int, paths: Collection[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, last refill)

    def allow(self, client: str) -> bool:
        now = self.clock()
        tokens, last = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            return False
        self.buckets[client] = (tokens - 1.0, now)
        if len(self.buckets) > 10_000:  # forget idle clients rather than grow without bound
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 120}
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path in self.paths:
            client = (scope.get("client") or ("?", 0))[0]
            if not self.allow(client):
                response = error_response(path, RateLimited("rate limit exceeded, retry later"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
