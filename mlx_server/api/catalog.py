"""Where each configured model is and what it is, computed in worker threads so the event loop never waits on disk.

`sources.locate` stats and hashes files and `modelinfo` parses GGUF headers (seconds for a large vocabulary); run on
the loop they stalled every request, /health included. The catalog runs them in its own small thread pool, one
computation per model at a time, caches the answers, warms every model at start-up, and serves a cached answer
while a stale one is re-read in the background. /api/pull and /api/delete invalidate their model, and a model
not on disk is re-checked on each request for it, so a pull made with the CLI is seen at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from mlx_server.config.load import Config
from mlx_server.contract.errors import ModelNotFound
from mlx_server.models.info import InfoCache, ModelInfo, with_embedding, with_vision
from mlx_server.models.sources import Located, locate

Describe = Callable[[Located], Optional[ModelInfo]]


@dataclass(frozen=True)
class Entry:
    located: Located
    info: Optional[ModelInfo]  # None when absent or unreadable


class Catalog:
    """Located + ModelInfo per configured model, off the event loop. One per app."""

    def __init__(
        self,
        config: Config,
        describe: Optional[Describe] = None,
        *,
        refresh_after: float = 10.0,
        workers: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.refresh_after = refresh_after
        # `describe` is a seam for tests that need a computation to take as long as they say.
        self._describe: Describe = describe or InfoCache().describe
        self._workers = workers
        self._clock = clock
        self._lock = threading.RLock()  # done-callbacks may run inline, in the thread that holds it
        self._done: dict[str, tuple[float, Entry]] = {}
        self._pending: dict[str, concurrent.futures.Future[Entry]] = {}
        self._generation: dict[str, int] = {}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def warm(self) -> None:
        """Start computing every configured model (in priority order) without waiting for any of them."""
        for model in sorted(self.config.models.values(), key=lambda m: m.priority):
            self._submit(model.name)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._pending.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def invalidate(self, name: str) -> None:
        """Forget `name` (its files changed): a computation already running for it will not be cached."""
        with self._lock:
            self._generation[name] = self._generation.get(name, 0) + 1
            self._done.pop(name, None)
            self._pending.pop(name, None)

    # ---- async accessors (what handlers await) ---------------------------------------------------------------

    async def entry(self, name: str, fresh: bool = False) -> Entry:
        """The cached entry (refreshed in the background when stale), or a new one when absent or `fresh`."""
        with self._lock:
            hit = None if fresh else self._done.get(name)
        if hit is not None:
            stamp, entry = hit
            if self._clock() - stamp > self.refresh_after:
                self._submit(name)
            return entry
        # shield: a client that goes away must not cancel a computation other requests are waiting for.
        return await asyncio.shield(asyncio.wrap_future(self._submit(name)))

    async def located(self, name: str) -> Located:
        return (await self.entry(name)).located

    async def info(self, name: str) -> Optional[ModelInfo]:
        return (await self.entry(name)).info

    async def entries(self) -> dict[str, Entry]:
        """Every configured model's entry, computed concurrently (the first listing after start-up waits here)."""
        names = list(self.config.models)
        found = await asyncio.gather(*(self.entry(n) for n in names))
        return dict(zip(names, found, strict=True))

    async def resolve(self, requested: str) -> str:
        """The configured name for a requested one; 404 when unknown or not on disk (with how to get it)."""
        name = self.config.resolve(requested)
        if name is None:
            raise ModelNotFound(requested)
        found = await self.located(name)
        if not found.present:
            found = (await self.entry(name, fresh=True)).located  # it may have been pulled since we looked
        if not found.present:
            raise ModelNotFound(requested, found.hint)
        return name

    # ---- the worker side -----------------------------------------------------------------------------------

    def _compute(self, name: str) -> Entry:
        cfg_dir = self.config.path.parent if self.config.path else None
        model = self.config.models[name]
        found = locate(model, cfg_dir, self.config.server.cache_dir)
        # The description is cached per path; whether the model embeds or sees images also depends on its `kind`.
        if not found.present:
            return Entry(found, None)
        info = with_vision(self._describe(found), model.kind)
        return Entry(found, with_embedding(info, found, model.kind))

    def _submit(self, name: str) -> concurrent.futures.Future[Entry]:
        with self._lock:
            future = self._pending.get(name)
            if future is not None:
                return future
            if self._pool is None:  # made on first use, so an app used after close() still works
                self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="catalog")
            future = self._pool.submit(self._compute, name)
            self._pending[name] = future
            generation = self._generation.get(name, 0)
        future.add_done_callback(lambda f: self._store(name, generation, f))
        return future

    def _store(self, name: str, generation: int, future: concurrent.futures.Future[Entry]) -> None:
        with self._lock:
            if self._pending.get(name) is future:
                del self._pending[name]
            if future.cancelled() or future.exception() is not None:
                return  # not cached: the next request tries again (and sees the error itself)
            if self._generation.get(name, 0) == generation:
                self._done[name] = (self._clock(), future.result())
