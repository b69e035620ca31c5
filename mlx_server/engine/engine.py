"""The engine as the API sees it: an `EngineClient` over the preparation stage and the inference thread.

A request is accepted or refused here, at once (draining, dead engine, full queue); then its kind
(engine/kinds/) prepares it in a worker thread and the job is handed to the inference thread, or, for a
request its preparation answers (counting tokens), the answer is delivered from the worker. Each accepted
request ends in exactly one Done or Failed, delivered through its sink.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Sequence

from mlx_server.config.load import Config
from mlx_server.contract.errors import InternalError, MlxServerError, ModelLoadFailed, ServerBusy, ServiceUnavailable
from mlx_server.contract.events import Done, Event, Failed, Sink, Usage
from mlx_server.contract.requests import EngineRequest
from mlx_server.contract.status import EngineStatus, Observer
from mlx_server.engine import kinds
from mlx_server.engine.distributed.lockstep import Lockstep
from mlx_server.engine.distributed.pacing import LockstepPacing
from mlx_server.engine.kinds.base import Reply
from mlx_server.engine.loop.commands import Admit, Cancel, Preload
from mlx_server.engine.loop.core import Core
from mlx_server.engine.loop.jobs import Job
from mlx_server.engine.model.loader import ModelLoader
from mlx_server.engine.prepare.stage import Preparer

log = logging.getLogger("mlx_server.engine")


class Engine:
    """Implements mlx_server.contract.status.EngineClient."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        importer: Optional[Callable[[Path, Path], Path]] = None,
        load_slice: float = 0.05,
        lockstep: Optional[Lockstep] = None,
        on_broken: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.config = config
        self.preparer = Preparer(config, importer=importer)
        self.kinds = kinds.Kinds()
        self.loader = ModelLoader(
            config, self.preparer, kinds.worker_factories(), slice_seconds=load_slice, lockstep=lockstep
        )
        pacing = LockstepPacing(lockstep, self.preparer) if lockstep is not None else None
        self.core = Core(config, self.loader, clock, pacing=pacing)
        self.lockstep = lockstep
        self._on_broken = on_broken  # distributed: what the process does once the group is broken (exit non-zero)
        self._broken: Optional[str] = None
        self._lock = threading.RLock()  # a sink called under it may end the request, which takes it again
        self._in_flight = 0
        self._draining = False
        self._cancelled: set[int] = set()  # cancelled while still being prepared
        self._prepare_errors: dict[str, str] = {}  # model → why its files could not be made (e.g. a bad GGUF)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.core.start()
        if self.lockstep is not None:
            threading.Thread(target=self._watch, name="mlx-watchdog", daemon=True).start()
            if self.lockstep.leader:
                self.preparer.executor.submit(self._check_shardable)
        wanted = [m.name for m in self.config.models.values() if m.preload]
        if wanted:
            self.preload(wanted)  # in the background: start-up never waits for it

    def stop(self, timeout: float = 10.0) -> None:
        self.core.stop(timeout)
        self.preparer.close()

    def _check_shardable(self) -> None:
        """At start, say which configured models a distributed group cannot serve (in the log and in /health)."""
        for name in self.config.models:
            try:
                problem = self.loader.split(name)[1]
            except MlxServerError:
                continue  # missing or broken files: /health reports those already
            except Exception:  # noqa: BLE001 - an unknown architecture fails its load later, with its own message
                log.exception("checking whether %s can be sharded", name)
                continue
            if problem is not None:
                log.error("%s", problem)
                self._prepare_errors[name] = problem

    def _watch(self) -> None:
        """Distributed: a rank that died makes the plan exchange raise (the inference thread ends with it); one that
        hangs leaves it waiting. Either way every request ends with an error now, /health says unhealthy, and
        the process is told to exit so the launcher (and launchd) restart the group."""
        assert self.lockstep is not None
        while True:
            time.sleep(0.25)
            if not self.core.alive:
                if self.core.fatal is None:
                    return  # an orderly shutdown (the Shutdown command reached every rank)
                why = f"the distributed group failed: {self.core.fatal}"
            elif self.lockstep.stuck_for(time.monotonic()) > 0:
                why = (
                    f"rank {self.lockstep.rank} waited more than {self.lockstep.timeout:g}s on the other ranks "
                    "of the distributed group (a rank died or hangs)"
                )
            else:
                continue
            self._broken = why
            log.error("%s; ending every request and exiting", why)
            self.core.abort(ServiceUnavailable(why))
            self._on_broken(why)
            return

    def drain(self) -> None:
        self._draining = True

    @property
    def alive(self) -> bool:
        return self.core.alive

    def status(self) -> EngineStatus:
        errors = {**self._prepare_errors, **self.core.load_errors}
        status = replace(
            self.core.status,
            alive=self.core.alive,
            draining=self._draining,
            in_flight=self._in_flight,
            load_errors=tuple(sorted(errors.items())),
        )
        if self.lockstep is not None:
            status = replace(status, world=replace(self.lockstep.status(), broken=self._broken))
        return status

    def observe(self, observer: Observer) -> None:
        self.core.ledger.observer = observer

    def preload(self, names: Sequence[str]) -> None:
        def prepare_then_load() -> None:
            ready = []
            for name in names:
                try:
                    self.preparer.files(name)
                    ready.append(name)
                except MlxServerError as exc:
                    log.warning("preload of %s skipped: %s", name, exc.message)
            self.core.post(Preload(tuple(ready)))

        self.preparer.executor.submit(prepare_then_load)

    def forget(self, name: str) -> None:
        self.preparer.forget(name)

    # ---- requests -----------------------------------------------------------------------------------------

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Accept a request (or raise its refusal); its events go to `sink`, from other threads."""
        if self._draining:
            raise ServiceUnavailable("server is shutting down")
        if not self.core.alive:
            raise ServiceUnavailable("inference engine is not running")
        s = self.config.server
        with self._lock:
            if self._in_flight >= s.max_queue + s.max_concurrent:
                raise ServerBusy()
            self._in_flight += 1
        sink = self._counted(request.request_id, sink)
        kind = self.kinds.of(request)
        if kind is None:
            sink(Failed(request.request_id, InternalError(f"not an engine request: {type(request).__name__}")))
        elif kind.inline:
            self._prepared(request, sink, kind.prepare(self.preparer, request))
        else:
            self._in_worker(request, sink, lambda r: kind.prepare(self.preparer, r), self._prepared)

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            try:
                self.core.post(Cancel(request_id))
            except ServiceUnavailable:
                pass  # the thread is gone and has ended everything it held

    async def stream(self, request: EngineRequest) -> AsyncIterator[Event]:
        """Events for one request; leaving the iteration early cancels it in the engine."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                pass

        self.submit(request, sink)
        finished = False
        try:
            while True:
                event = await events.get()
                finished = isinstance(event, (Done, Failed))
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)

    # ---- plumbing -----------------------------------------------------------------------------------------

    def _counted(self, request_id: int, sink: Sink) -> Sink:
        ended = threading.Event()

        def counted(event: Event) -> None:
            if isinstance(event, (Done, Failed)):
                if ended.is_set():
                    return  # exactly one terminal event reaches the client
                ended.set()
                with self._lock:
                    self._in_flight -= 1
                    self._cancelled.discard(request_id)
            sink(event)

        return counted

    def _in_worker(self, request: EngineRequest, sink: Sink, work: Callable, then: Callable) -> None:
        def done(future: Future) -> None:
            try:
                result = future.result()
            except MlxServerError as exc:
                if isinstance(exc, ModelLoadFailed):
                    self._prepare_errors[request.model] = exc.message
                sink(Failed(request.request_id, exc))
                return
            except BaseException as exc:  # noqa: BLE001 - one request's failure is its own
                log.exception("preparing request %d failed", request.request_id)
                sink(Failed(request.request_id, InternalError(f"request failed: {exc}")))
                return
            self._prepare_errors.pop(request.model, None)
            then(request, sink, result)

        try:
            self.preparer.executor.submit(work, request).add_done_callback(done)
        except RuntimeError:  # the executor is shut down: the server is stopping
            sink(Failed(request.request_id, ServiceUnavailable("server is shutting down")))

    def _prepared(self, request: EngineRequest, sink: Sink, result: Job | Reply) -> None:
        if isinstance(result, Reply):
            for event in result.events:
                sink(event)
            return
        with self._lock:
            if request.request_id in self._cancelled:
                sink(Done(request.request_id, request.model, "cancelled", Usage()))
                return
            try:
                self.core.post(Admit(result, sink))
            except ServiceUnavailable as exc:
                sink(Failed(request.request_id, exc))


__all__ = ["Engine"]
