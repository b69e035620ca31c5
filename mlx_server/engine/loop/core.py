"""The inference thread: drain commands → admit waiting requests → step every active batch → publish status.

It is the only thread that touches MLX, and it does nothing else: requests arrive prepared (engine/prepare.py),
loads advance in slices, and what handlers may read is published as one frozen EngineStatus per iteration.
Memory is checked before it is used: weights, the KV reserved for every admitted sequence and the stored prompt
caches together stay within the budget (pool.make_room), and a request that does not fit waits its turn.
Every request the thread accepts is registered until its terminal event; whatever fails — a step, a cleanup,
the thread itself — each registered request still gets exactly one Done or Failed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Callable, Literal, Optional

from mlx_server.config.load import Config
from mlx_server.engine.loop.admission import Waiting, WaitList, keep_alive_of
from mlx_server.engine.loop.commands import Admit, Cancel, Command, Control, Preload, Shutdown, Sink, deliver, fail_untaken
from mlx_server.engine.loop.intake import Intake
from mlx_server.engine.distributed.lockstep import Lockstep, one_stream
from mlx_server.engine.model.loader import LoadedModel, ModelLoader
from mlx_server.engine.loop.pool import ModelPool
from mlx_server.engine.loop.prefill import PrefillChunk, Prefiller
from mlx_server.engine.prepare.stage import Prepared, PreparedEmbed
from mlx_server.engine.model.runner import kv_bound
from mlx_server.engine.loop.budget import available_memory, limit_metal_memory, trim_stored_caches
from mlx_server.engine.loop.snapshot import prefill_status, resident_status
from mlx_server.contract.errors import (InsufficientMemory, InternalError, MlxServerError, ModelNotFound, RequestTimeout, ServiceUnavailable)
from mlx_server.contract.status import EngineCounters, EngineStatus, MemoryStatus, Observer
from mlx_server.contract.events import Done, Event, Failed, Usage
from mlx_server.contract.requests import EngineRequest, LoadRequest, UnloadRequest

log = logging.getLogger("mlx_server.engine")

Outcome = Literal["started", "parked", "blocked"]


class Core:
    def __init__(self, config: Config, loader: ModelLoader, clock: Callable[[], float] = time.monotonic,
                 lockstep: Optional[Lockstep] = None) -> None:
        self.config = config
        self.loader = loader
        self.lockstep = lockstep  # distributed: time reads the plan's clock, free memory is the tightest rank's
        self._now = 0.0
        self._free = 0
        self._planned: tuple[PrefillChunk, ...] = ()
        if lockstep is not None:
            clock = lambda: self._now  # noqa: E731
        self.clock = clock
        self._monotonic: Callable[[], float] = clock if lockstep is not None else time.monotonic
        s = config.server
        self.pool: ModelPool[LoadedModel] = ModelPool(
            budget=s.memory_budget, max_models=s.max_loaded_models, loader=loader.load, estimate=loader.estimate,
            unloader=loader.unload, clock=clock,
            available=available_memory if lockstep is None else (lambda: self._free),
            held=lambda m: m.runner.kv_reserved + m.runner.stored_cache_bytes, trim=self._trim_caches)
        self.intake = Intake(lockstep, loader.preparer, clock if lockstep is None else time.monotonic)
        self._waiting = WaitList()
        self.prefiller = Prefiller(s.prefill_slice, s.prefill_chunk, self._waiting.aging, clock,
                                   contained=lockstep is None)
        self._sinks: dict[int, Sink] = {}  # every accepted request until its terminal event
        self._requests: dict[int, EngineRequest] = {}
        self._owner: dict[int, str] = {}  # request_id → model, for requests admitted into a runner
        self._preloads: collections.deque[str] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.observer: Optional[Observer] = None
        self.status = EngineStatus(memory=MemoryStatus(budget=s.memory_budget))
        self._counters = EngineCounters()
        self.fatal: Optional[str] = None  # why the thread died (set before it stops taking commands)
        self.load_errors: dict[str, str] = {}  # model → its last load failure, until it loads (read by Engine)

    # ---- any thread ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlx-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        try:
            self.post(Shutdown())
        except ServiceUnavailable:
            return
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.intake.closed

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def abort(self, error: MlxServerError) -> None:
        """From the watchdog, while the inference thread is stuck waiting on a rank: end every request now (the
        façade lets only the first terminal event of each reach its client) and refuse the rest."""
        self.fatal = self.fatal or error.message
        fail_untaken(self.intake.close(), error)
        for request_id, sink in list(self._sinks.items()):
            deliver(sink, Failed(request_id, error))

    def post(self, cmd: Command) -> None:
        """Queue a command; raises ServiceUnavailable once the thread has stopped (nothing is left behind)."""
        self.intake.post(cmd)

    # ---- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with one_stream() if self.lockstep is not None else contextlib.nullcontext():
            self._loop()

    def _loop(self) -> None:
        limit_metal_memory(self.config.server.memory_budget)
        error: MlxServerError = ServiceUnavailable("server is shutting down")
        try:
            while not self._stopping:
                busy = (self.pool.loading is not None or bool(self._preloads) or self._waiting.ready()
                        or any(r.model.runner.has_work() for r in self.pool.residents()))
                expiry = None if busy else self.pool.next_expiry()  # an idle wait ends when a keep_alive does
                turn = self.intake.turn(not busy, expiry, lambda: self.prefiller.plan(
                    [entry.model.runner for entry in self.pool.residents()]))
                self._now, self._free, self._planned = turn.now, turn.free, turn.prefill
                self._handle_all(turn.commands)
                if self._stopping:
                    break
                self._admit()
                self._step_all()
                self._prefill()
                self._advance_load()
                self._next_preload()
                self.pool.sweep()
                self._publish()
        except BaseException as exc:  # noqa: BLE001 - record why the thread died so /health can say so
            log.exception("inference thread died")
            error = ServiceUnavailable(f"inference engine failed: {exc}")
            self.fatal = repr(exc)
        finally:
            self._close(error)
        try:
            self.pool.unload_all()
        except Exception:  # noqa: BLE001 - exiting anyway
            log.exception("unloading at shutdown")
        self._publish()

    def _close(self, error: MlxServerError) -> None:
        """Stop taking commands, then end every request still known: queued, waiting or running."""
        fail_untaken(self.intake.close(), error)
        for request_id in list(self._sinks):
            self._end(request_id, Failed(request_id, error))

    def _handle_all(self, cmds: list[Command]) -> None:
        for i, cmd in enumerate(cmds):
            try:
                self._handle(cmd)
            except BaseException:
                fail_untaken(cmds[i:], InternalError("the inference engine failed"))  # _close cannot reach them
                raise

    def _handle(self, cmd: Command) -> None:
        if isinstance(cmd, (Admit, Control)):
            job = cmd.prepared if isinstance(cmd, Admit) else cmd.request
            req = job.request if isinstance(job, (Prepared, PreparedEmbed)) else job
            self._sinks[req.request_id] = cmd.sink
            self._requests[req.request_id] = req
            self._waiting.push(Waiting(job, cmd.sink, self.clock()))
            prio = list(self._counters.by_priority)
            prio[int(req.priority)] += 1
            self._count(total_queued=self._counters.total_queued + 1, by_priority=tuple(prio))
        elif isinstance(cmd, Cancel):
            self._cancel(cmd.request_id)
        elif isinstance(cmd, Preload):
            self._preloads.extend(cmd.names)
        elif isinstance(cmd, Shutdown):
            self._stopping = True
        else:
            # Only typed commands cross the queue; anything else is a bug worth dying loudly for (and /health says so).
            raise TypeError(f"not an engine command: {cmd!r}")

    # ---- ending requests ----------------------------------------------------------------------------------

    def _end(self, request_id: int, event: Event) -> None:
        """End a request: release its model (keep_alive 0 unloads it now) and publish, so what the client may look
        at next is already visible; then deliver its terminal event. Bookkeeping failures never cost the event."""
        sink = self._sinks.pop(request_id, None)
        req = self._requests.pop(request_id, None)
        if sink is None:
            return
        self._observe(req, event)
        try:
            name = self._owner.pop(request_id, None)
            if name is not None and req is not None:
                self.pool.release(name, keep_alive_of(self.config, req))
        except Exception:  # noqa: BLE001 - e.g. an unload that failed; the request still gets its answer
            log.exception("releasing request %d", request_id)
        cancelled = isinstance(event, Done) and event.reason == "cancelled"
        self._count(total_processed=self._counters.total_processed + 1,
                    cancelled=self._counters.cancelled + cancelled)
        try:
            self._publish()
        finally:
            deliver(sink, event)

    def _sink_for(self, request_id: int) -> Sink:
        """What a runner publishes into: terminal events go through _end, the rest straight to the client."""

        def sink(event: Event) -> None:
            if isinstance(event, (Done, Failed)):
                self._end(request_id, event)
            else:
                self._observe(self._requests.get(request_id), event)
                target = self._sinks.get(request_id)
                if target is not None:
                    deliver(target, event)

        return sink

    def _observe(self, req: Optional[EngineRequest], event: Event) -> None:
        if self.observer is not None and req is not None:
            try:
                self.observer(req, event)
            except Exception:  # noqa: BLE001 - observability must never break generation
                log.exception("event observer failed")

    def _cancel(self, request_id: int) -> None:
        waiting = self._waiting.remove(request_id)
        if waiting is not None:
            self._end(request_id, Done(request_id, waiting.request.model, "cancelled", Usage()))
            return
        name = self._owner.get(request_id)
        entry = self.pool.get(name) if name else None
        if entry is not None:
            entry.model.runner.cancel(request_id)

    # ---- admission ----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        limit = self.config.server.max_concurrent
        for w in self._waiting.expired(self._monotonic()):
            self._end(w.request.request_id, Failed(w.request.request_id, RequestTimeout(
                f"request timed out after {w.request.timeout:g}s waiting for its turn")))
        # Parked requests (behind a load) count: max_concurrent bounds every started sequence.
        while self._waiting.ready() and len(self._owner) + self._waiting.parked < limit:
            w = self._waiting.peek(self.clock())
            request_id = w.request.request_id
            try:
                outcome = self._try_start(w)
            except MlxServerError as exc:
                self._waiting.discard(w)
                self._end(request_id, Failed(request_id, exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one request's failure must fail it, never the thread
                log.exception("admitting request %d failed", request_id)
                self._waiting.discard(w)
                self._end(request_id, Failed(request_id, InternalError(f"request failed: {exc}")))
                continue
            if outcome == "blocked":
                break  # memory is held by requests in flight: wait for them, in priority order
            self._waiting.discard(w)
            if outcome == "parked":
                self._waiting.park(w.request.model, w)

    def _try_start(self, w: Waiting) -> Outcome:
        job, name = w.job, w.request.model
        if name not in self.config.models:
            raise ModelNotFound(name)
        if isinstance(job, UnloadRequest):
            if self.pool.get(name) is not None:
                self.pool.set_keep_alive(name, 0)  # now if idle, else as soon as its requests finish
            self._end(job.request_id, Done(job.request_id, name, "unload", Usage(total_duration=self._age(job))))
            return "started"
        entry = self.pool.get(name)
        if isinstance(job, LoadRequest):
            got = self.pool.request(name)
            if isinstance(got, str):
                return "blocked" if got == "blocked" else "parked"
            self.pool.set_keep_alive(name, keep_alive_of(self.config, job))
            self._end(job.request_id, Done(job.request_id, name, "load", Usage(
                load_duration=w.load_seconds, total_duration=self._age(job))))
            return "started"
        assert isinstance(job, (Prepared, PreparedEmbed))
        if entry is None:
            files = self.loader.preparer.files(name)  # made by the preparation stage already: no disk work here
            got = self.pool.request(name, reserve=kv_bound([job.kv_tokens], files.kv_per_token))
            if isinstance(got, str):
                return "blocked" if got == "blocked" else "parked"
            entry = got
        runner = entry.model.runner
        alone = entry.size + runner.footprint(job)
        if alone > self.pool.budget:
            raise InsufficientMemory(
                f"model \"{name}\" needs {alone / 1e9:.2f} GB for this request (weights {entry.size / 1e9:.2f} GB + "
                f"KV for {job.kv_tokens} tokens), more than the memory budget of {self.pool.budget / 1e9:.2f} GB")
        if not self.pool.make_room(runner.kv_needed(job), keep=name):
            return "blocked"
        self.pool.acquire(name)
        self._owner[job.request.request_id] = name
        runner.add(job, self._sink_for(job.request.request_id), w.load_seconds)
        return "started"

    def _age(self, req: EngineRequest) -> float:
        return max(0.0, time.monotonic() - req.created)

    def _advance_load(self) -> None:
        name = self.pool.loading
        if name is None:
            return
        try:
            entry = self.pool.advance()
        except MlxServerError as exc:
            self.load_errors[name] = exc.message
            for w in self._waiting.unpark(name):
                self._end(w.request.request_id, Failed(w.request.request_id, exc))
            self._waiting.requeue_parked()
            return
        if entry is None:
            return
        self.load_errors.pop(name, None)
        # Its keep_alive clock starts now (a preload, or a load whose requests all left); requests set their own.
        self.pool.set_keep_alive(name, self.config.keep_alive_for(name))
        for w in self._waiting.unpark(name):
            w.load_seconds = entry.load_seconds
            self._waiting.push(w)
        self._waiting.requeue_parked()

    def _next_preload(self) -> None:
        if not self._preloads or self.pool.loading is not None:
            return
        name = self._preloads.popleft()
        try:
            if self.pool.get(name) is not None:
                return
            if not self.pool.preload(name, self.loader.estimate(name)):
                self._preloads.clear()  # the budget is reached: later preloads would not fit either
        except MlxServerError as exc:
            log.warning("preload of %s skipped: %s", name, exc.message)

    # ---- stepping -----------------------------------------------------------------------------------------

    def _step_all(self) -> None:
        generated = 0
        for entry in self.pool.residents():
            runner = entry.model.runner
            if not runner.has_work():
                continue
            try:
                generated += runner.step(self._monotonic())
            except Exception as exc:  # noqa: BLE001 - a bad step fails that batch, never the thread
                if self.lockstep is not None:
                    raise  # a group whose step failed (a lost rank, most often) no longer agrees: it must restart
                log.exception("decode step failed for %s", entry.name)
                runner.fail_all(InternalError(f"generation failed: {exc}"))
        self._trim_caches(0)
        if generated:
            self._count(steps=self._counters.steps + 1,
                        generated_tokens=self._counters.generated_tokens + generated)

    def _prefill(self) -> None:
        """At most one slice of prompt prefill between decode steps, so running streams keep going."""
        runners = [entry.model.runner for entry in self.pool.residents()]
        if any(r.joining for r in runners):
            return  # a sequence that just joined gets its first token before more prefill
        if self.lockstep is not None:
            planned, self._planned = self._planned, ()
            done = self.prefiller.apply(runners, planned)
        else:
            done = self.prefiller.run(runners, interrupted=lambda: not self.intake.empty())
        if done.chunks:
            self._count(prefill_tokens=self._counters.prefill_tokens + done.tokens,
                        prefill_chunks=self._counters.prefill_chunks + done.chunks,
                        prefill_slices=self._counters.prefill_slices + 1)

    def _trim_caches(self, free: int) -> None:
        trim_stored_caches(self.pool, self.config.server.prompt_cache_bytes, free)

    # ---- status -------------------------------------------------------------------------------------------

    def _count(self, **changes: object) -> None:
        self._counters = EngineCounters(**{**self._counters.__dict__, **changes})

    def _publish(self) -> None:
        """Replace the status snapshot; after every loop iteration and every request's end."""
        now_active = len(self._owner) + self._waiting.parked
        self._counters = EngineCounters(**{**self._counters.__dict__, "active_requests": now_active,
                                           "queue_size": len(self._waiting) - self._waiting.parked})
        models, memory = resident_status(self.pool)
        self.status = EngineStatus(alive=self.fatal is None and not self.intake.closed, fatal=self.fatal,
                                   counters=self._counters, world=self.lockstep.status() if self.lockstep else None,
                                   models=tuple(models), pool=self.pool.stats, memory=memory,
                                   prefill=prefill_status(self.pool))


__all__ = ["Core"]
