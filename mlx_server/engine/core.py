"""The inference thread: drain commands → admit waiting requests → step every active batch → publish events.

It is the only thread that touches MLX. Handlers talk to it through typed commands on a queue and receive
typed events through a per-request sink; `Engine.stream()` wraps that as an async iterator whose closing
(client gone, handler cancelled) sends a Cancel, so the sequence leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable, Optional

import mlx.core as mx

from mlx_server.config import Config
from mlx_server.engine.admission import Waiting, WaitList
from mlx_server.engine.loader import LoadedModel, ModelLoader
from mlx_server.engine.pool import FOREVER, ModelPool, Resident
from mlx_server.errors import (InternalError, MlxServerError, ModelNotFound, RequestTimeout, ServerBusy,
                               ServiceUnavailable)
from mlx_server.types import (Cancel, Command, Done, EngineCounters, Event, Failed, GenerateRequest, Preload, Shutdown,
                              Started, Submit, Usage)

log = logging.getLogger("mlx_server.engine")

Sink = Callable[[Event], None]


class Engine:
    def __init__(self, config: Config, *, loader: Optional[ModelLoader] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.loader = loader or ModelLoader(config)
        self.clock = clock
        s = config.server
        self.pool: ModelPool[LoadedModel] = ModelPool(
            budget=s.memory_budget, max_models=s.max_loaded_models, loader=self.loader.load,
            estimate=self.loader.estimate, unloader=self.loader.unload, clock=clock,
            available=self.loader.reclaimable_memory)
        self._commands: "queue.Queue[Command]" = queue.Queue()
        self._waiting = WaitList()
        self._owner: dict[int, str] = {}  # request_id → model name, for requests admitted into a runner
        self._preloads: collections.deque[str] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.fatal: Optional[BaseException] = None
        self.counters = EngineCounters()
        # Observer of every event (metrics); runs on the inference thread and must not raise into it.
        self.on_event: Optional[Callable[[GenerateRequest, Event], None]] = None
        self._submitted = 0  # handler-side count, so a full queue is refused before the engine sees it
        self.draining = False  # set at shutdown: new requests are refused, in-flight ones finish
        self._lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlx-inference", daemon=True)
        self._thread.start()
        wanted = [m.name for m in self.config.models.values() if m.preload]
        if wanted:
            self.preload(wanted)  # in the background: start-up never waits for it

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self._commands.put(Shutdown())
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (queued, loading or generating)."""
        return self._submitted

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal is None

    # ---- handler side (any thread) ------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, sink: Sink) -> None:
        if self.draining:
            raise ServiceUnavailable("server is shutting down")
        if not self.alive:
            raise ServiceUnavailable("inference engine is not running")
        with self._lock:
            if self._submitted >= self.config.server.max_queue + self.config.server.max_concurrent:
                raise ServerBusy()
            self._submitted += 1
        self._commands.put(Submit(request, sink))

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        self._commands.put(Cancel(request_id, reason))  # type: ignore[arg-type]

    def preload(self, names: list[str]) -> None:
        self._commands.put(Preload(tuple(names)))

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
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
                if isinstance(event, (Done, Failed)):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)

    # ---- inference thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                busy = (self.pool.loading is not None or bool(self._preloads)
                        or any(r.model.runner.has_work() for r in self._residents()))
                self._drain(block=not busy)
                if self._stopping:
                    break
                self._admit()
                self._step_all()
                self._advance_load()
                self._next_preload()
                self.pool.sweep()
                self._read_memory()
        except BaseException as exc:  # noqa: BLE001 - record why the thread died so /health can say so
            self.fatal = exc
            log.exception("inference thread died")
            self._fail_everything(ServiceUnavailable(f"inference engine failed: {exc}"))
        else:
            self._fail_everything(ServiceUnavailable("server is shutting down"))
            self.pool.unload_all()

    def _residents(self) -> list:
        return [r for name in self.pool.names() if (r := self.pool.get(name)) is not None]

    def _drain(self, block: bool) -> None:
        timeout = None
        if block:
            expiry = self.pool.next_expiry()
            timeout = 1.0 if expiry is None else min(1.0, max(0.0, expiry - self.clock()))
        try:
            cmd = self._commands.get(block=block, timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: Command) -> None:
        if isinstance(cmd, Submit):
            req = cmd.request
            self._waiting.push(Waiting(req, self._wrap_sink(req, cmd.sink), self.clock()))
            c = self.counters
            prio = list(c.by_priority)
            prio[int(req.priority)] += 1
            self._set_counters(total_queued=c.total_queued + 1, by_priority=tuple(prio))
        elif isinstance(cmd, Cancel):
            self._cancel(cmd.request_id)
        elif isinstance(cmd, Preload):
            self._preloads.extend(cmd.names)
        elif isinstance(cmd, Shutdown):
            self._stopping = True
        else:
            # Only typed commands cross the queue; anything else is a bug worth dying loudly for (and /health says so).
            raise TypeError(f"not an engine command: {cmd!r}")

    def _wrap_sink(self, req: GenerateRequest, sink: Sink) -> Sink:
        """Observe each request's end to release the model and keep the counters honest."""

        def wrapped(event: Event) -> None:
            if self.on_event is not None:
                try:
                    self.on_event(req, event)
                except Exception:  # noqa: BLE001 - observability must never break generation
                    log.exception("event observer failed")
            if isinstance(event, (Done, Failed)):
                with self._lock:
                    self._submitted -= 1
                name = self._owner.pop(req.request_id, None)
                if name is not None:
                    self.pool.release(name, self._keep_alive(req))
                c = self.counters
                self._set_counters(total_processed=c.total_processed + 1,
                                   cancelled=c.cancelled + (isinstance(event, Done) and event.reason == "cancelled"))
            sink(event)

        return wrapped

    def _keep_alive(self, req: GenerateRequest) -> float:
        """Ollama's order: the request's keep_alive, else the model's, else the server default."""
        if req.keep_alive is not None:
            return req.keep_alive
        return self._model_keep_alive(req.model)

    def _model_keep_alive(self, name: str) -> float:
        model = self.config.models.get(name)
        if model is not None and model.keep_alive is not None:
            return model.keep_alive
        return self.config.server.keep_alive

    def _cancel(self, request_id: int) -> None:
        waiting = self._waiting.remove(request_id)
        if waiting is not None:
            waiting.sink(Done(request_id, waiting.request.model, "cancelled", Usage()))
            return
        name = self._owner.get(request_id)
        entry = self.pool.get(name) if name else None
        if entry is not None:
            entry.model.runner.cancel(request_id)

    def _admit(self) -> None:
        limit = self.config.server.max_concurrent
        for w in self._waiting.expired(time.monotonic()):
            w.sink(Failed(w.request.request_id, RequestTimeout(
                f"request timed out after {w.request.timeout:g}s waiting for its turn")))
        while self._waiting.ready() and len(self._owner) < limit:
            w = self._waiting.pop(self.clock())
            try:
                self._admit_one(w)
            except MlxServerError as exc:
                w.sink(Failed(w.request.request_id, exc))
            except Exception as exc:  # noqa: BLE001 - one request's bad input must fail it, never kill the thread
                log.exception("admitting request %d failed", w.request.request_id)
                w.sink(Failed(w.request.request_id, InternalError(f"request failed: {exc}")))
        self._publish_queue()

    def _publish_queue(self) -> None:
        self._set_counters(queue_size=len(self._waiting), active_requests=len(self._owner))

    def _admit_one(self, w: Waiting) -> None:
        req = w.request
        if req.model not in self.config.models:
            raise ModelNotFound(req.model)
        if req.is_empty and req.keep_alive == 0:
            unloaded = self.pool.unload(req.model)
            log.info("unload-only request for %s (%s)", req.model, "unloaded" if unloaded else "not resident")
            w.sink(Done(req.request_id, req.model, "unload", Usage()))
            return
        entry = self.pool.request(req.model)
        if entry is None:
            self._waiting.park(req.model, w)
            return
        self._start(w, entry, 0.0)

    def _start(self, w: Waiting, entry: Resident[LoadedModel], load_seconds: float) -> None:
        req = w.request
        if req.is_empty:
            self.pool.set_keep_alive(req.model, self._keep_alive(req))
            w.sink(Done(req.request_id, req.model, "load", Usage(load_duration=load_seconds,
                                                                  total_duration=load_seconds)))
            return
        self.pool.acquire(req.model)
        self._owner[req.request_id] = req.model
        try:
            entry.model.runner.add(req, w.sink, load_seconds)
        except BaseException:
            self._owner.pop(req.request_id, None)
            self.pool.release(req.model, self._keep_alive(req))
            raise

    def _advance_load(self) -> None:
        name = self.pool.loading
        if name is None:
            return
        try:
            entry = self.pool.advance()
        except MlxServerError as exc:
            for w in self._waiting.unpark(name):
                w.sink(Failed(w.request.request_id, exc))
            self._waiting.requeue_parked()
            self._publish_queue()
            return
        if entry is None:
            return
        waiting = self._waiting.unpark(name)
        if not waiting:
            # A preload, or a load whose requests all left: its keep_alive clock starts now.
            self.pool.set_keep_alive(name, self._model_keep_alive(name))
        for w in waiting:
            try:
                self._start(w, entry, entry.load_seconds)
            except MlxServerError as exc:
                w.sink(Failed(w.request.request_id, exc))
            except Exception as exc:  # noqa: BLE001 - as in _admit: fail this request, keep the thread
                log.exception("starting request %d failed", w.request.request_id)
                w.sink(Failed(w.request.request_id, InternalError(f"request failed: {exc}")))
        self._waiting.requeue_parked()
        self._publish_queue()

    def _next_preload(self) -> None:
        if not self._preloads or self.pool.loading is not None:
            return
        name = self._preloads.popleft()
        try:
            if self.pool.get(name) is not None:
                return
            need = self.loader.estimate(name)
            if (self.pool.resident_bytes() + need > self.pool.budget
                    or len(self.pool.names()) >= self.pool.max_models):
                log.info("preload stopped at %s: it needs %.2f GB and the memory budget (%.2f of %.2f GB used, "
                         "%d models) is reached", name, need / 1e9, self.pool.resident_bytes() / 1e9,
                         self.pool.budget / 1e9, len(self.pool.names()))
                self._preloads.clear()
                return
            log.info("preloading %s", name)
            self.pool.request(name)
        except MlxServerError as exc:
            log.warning("preload of %s skipped: %s", name, exc.message)

    def _step_all(self) -> None:
        generated = 0
        for entry in self._residents():
            runner = entry.model.runner
            if not runner.has_work():
                continue
            try:
                generated += runner.step()
            except Exception as exc:  # noqa: BLE001 - a bad step fails that batch, never the thread
                log.exception("decode step failed for %s", entry.name)
                runner.fail_all(InternalError(f"generation failed: {exc}"))
                runner.reset()
        self._cap_prompt_caches()
        if generated:
            c = self.counters
            self._set_counters(steps=c.steps + 1, generated_tokens=c.generated_tokens + generated,
                               active_requests=len(self._owner))

    def _read_memory(self) -> None:
        active, peak, cached = mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory()
        c = self.counters
        if (active, peak, cached) != (c.mlx_active_bytes, c.mlx_peak_bytes, c.mlx_cache_bytes):
            self._set_counters(mlx_active_bytes=active, mlx_peak_bytes=peak, mlx_cache_bytes=cached)

    def _cap_prompt_caches(self) -> None:
        """One byte cap for the stored prompt caches of all resident models; least recently used models give first."""
        runners = [entry.model.runner for entry in self._residents()]
        over = sum(r.prompt_cache.nbytes for r in runners) - self.config.server.prompt_cache_bytes
        for runner in runners:
            if over <= 0:
                return
            before = runner.prompt_cache.nbytes
            runner.trim_prompt_cache(before - over)
            over -= before - runner.prompt_cache.nbytes

    def _fail_everything(self, error: MlxServerError) -> None:
        for w in self._waiting.take_all():
            w.sink(Failed(w.request.request_id, error))
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, Submit):
                cmd.sink(Failed(cmd.request.request_id, error))
        for entry in self._residents():
            try:
                entry.model.runner.fail_all(error)
            except Exception:  # noqa: BLE001 - best effort while dying
                log.exception("failing requests of %s", entry.name)

    def _set_counters(self, **changes: object) -> None:
        self.counters = EngineCounters(**{**self.counters.__dict__, **changes})


__all__ = ["Engine", "EngineCounters", "FOREVER", "Started"]
