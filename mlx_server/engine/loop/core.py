"""The inference thread: drain commands → admit waiting requests → step every active batch → publish status.

It is the only thread that touches MLX, and it does nothing else: requests arrive prepared (engine/prepare/),
loads advance in slices, and what handlers may read is published as one frozen EngineStatus per iteration.
Memory is checked before it is used: weights, the KV reserved for every admitted sequence and the stored prompt
caches together stay within the budget (loop/budget.py), and a request that does not fit waits its turn.
Requests are jobs (loop/jobs.py): the thread admits, steps and ends them without knowing their kind.
Every request the thread accepts is registered until its terminal event; whatever fails — a step, a cleanup,
the thread itself — each registered request still gets exactly one Done or Failed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Optional

from mlx_server.config.load import Config
from mlx_server.contract.errors import InternalError, MlxServerError, ModelNotFound, RequestTimeout, ServiceUnavailable
from mlx_server.contract.events import Done, Event, Failed, Usage
from mlx_server.contract.status import EngineCounters, EngineStatus, MemoryStatus
from mlx_server.engine.loop.admission import Waiting, WaitList
from mlx_server.engine.loop.budget import Budget, limit_metal_memory, trim_stored_caches
from mlx_server.engine.loop.commands import Admit, Cancel, Command, Preload, Shutdown, deliver, fail_untaken
from mlx_server.engine.loop.intake import Intake
from mlx_server.engine.loop.jobs import Loader, Model, ModelJob, Outcome, Owned, Worker
from mlx_server.engine.loop.ledger import Ledger
from mlx_server.engine.loop.pacing import Pacing, Solo
from mlx_server.engine.loop.pool import ModelPool
from mlx_server.engine.loop.prefill import Prefiller
from mlx_server.engine.loop.snapshot import engine_status

log = logging.getLogger("mlx_server.engine")


class Core:
    def __init__(
        self,
        config: Config,
        loader: Loader,
        clock: Callable[[], float] = time.monotonic,
        pacing: Optional[Pacing] = None,
    ) -> None:
        self.config = config
        self.loader = loader
        self.pacing = pacing or Solo(clock)  # distributed: commands, clock and free memory come from the plan
        self.clock = self.pacing.clock
        s = config.server
        self.budget = Budget(
            s.memory_budget,
            s.max_loaded_models,
            held=lambda m: m.reserved + m.stored,
            trim=self._trim_caches,
            available=self.pacing.free,
        )
        self.pool: ModelPool[Model] = ModelPool(
            budget=self.budget, loader=loader.load, estimate=loader.estimate, unloader=loader.unload, clock=self.clock
        )
        self.intake = Intake()
        self._waiting = WaitList()
        self.prefiller = Prefiller(
            s.prefill_slice, s.prefill_chunk, self._waiting.aging, self.clock, contained=self.pacing.contained
        )
        self.ledger = Ledger()  # every accepted request until its terminal event
        self._owner: dict[int, Owned] = {}  # request_id → its model, for requests admitted into a worker
        self._preloads: collections.deque[str] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
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
        for request_id, sink in self.ledger.sinks():
            deliver(sink, Failed(request_id, error))

    def post(self, cmd: Command) -> None:
        """Queue a command; raises ServiceUnavailable once the thread has stopped (nothing is left behind)."""
        self.intake.post(cmd)

    # ---- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with self.pacing.context():
            self._loop()

    def _loop(self) -> None:
        limit_metal_memory(self.config.server.memory_budget)
        error: MlxServerError = ServiceUnavailable("server is shutting down")
        try:
            while not self._stopping:
                busy = (
                    self.pool.loading is not None
                    or bool(self._preloads)
                    or self._waiting.ready()
                    or any(r.model.has_work() for r in self.pool.residents())
                )
                expiry = None if busy else self.pool.next_expiry()  # an idle wait ends when a keep_alive does
                self._handle_all(self.pacing.turn(self.intake, not busy, expiry, self._workers, self.prefiller))
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
        for request_id, _ in self.ledger.sinks():
            self._end(request_id, Failed(request_id, error))

    def _handle_all(self, cmds: list[Command]) -> None:
        for i, cmd in enumerate(cmds):
            try:
                self._handle(cmd)
            except BaseException:
                fail_untaken(cmds[i:], InternalError("the inference engine failed"))  # _close cannot reach them
                raise

    def _handle(self, cmd: Command) -> None:
        if isinstance(cmd, Admit):
            req = cmd.job.request
            self.ledger.register(req, cmd.sink)
            self._waiting.push(Waiting(cmd.job, cmd.sink, self.clock()))
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
        sink = self.ledger.pop(request_id, event)
        if sink is None:
            return
        try:
            owned = self._owner.pop(request_id, None)
            if owned is not None:
                self.pool.release(owned.model, self.keep_alive(owned.model, owned.keep_alive))
        except Exception:  # noqa: BLE001 - e.g. an unload that failed; the request still gets its answer
            log.exception("releasing request %d", request_id)
        cancelled = isinstance(event, Done) and event.reason == "cancelled"
        self._count(total_processed=self._counters.total_processed + 1, cancelled=self._counters.cancelled + cancelled)
        try:
            self._publish()
        finally:
            deliver(sink, event)

    def _cancel(self, request_id: int) -> None:
        waiting = self._waiting.remove(request_id)
        if waiting is not None:
            self._end(request_id, Done(request_id, waiting.request.model, "cancelled", Usage()))
            return
        owned = self._owner.get(request_id)
        entry = self.pool.get(owned.model) if owned else None
        if entry is not None:
            for worker in entry.model.workers.values():
                if worker.cancel(request_id):  # the one worker that holds it
                    break

    # ---- admission ----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        limit = self.config.server.max_concurrent
        for w in self._waiting.expired(self.pacing.now()):
            self._end(
                w.request.request_id,
                Failed(
                    w.request.request_id,
                    RequestTimeout(f"request timed out after {w.request.timeout:g}s waiting for its turn"),
                ),
            )
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
        if w.request.model not in self.config.models:
            raise ModelNotFound(w.request.model)
        return w.job.admit(self, w.load_seconds)

    # ---- what jobs use while they are admitted (jobs.Admitting) ---------------------------------------------

    def run_on_model(
        self,
        job: ModelJob,
        kind: str,
        unsupported: MlxServerError,
        reserve: int,
        load_seconds: float,
        keep_alive: Optional[float],
    ) -> Outcome:
        name = job.request.model
        entry = self.pool.get(name)
        if entry is None:
            got = self.pool.request(name, reserve=reserve)
            if isinstance(got, str):
                return "blocked" if got == "blocked" else "parked"
            entry = got
        worker = entry.model.workers.get(kind)
        if worker is None:
            raise unsupported
        self.budget.check_alone(name, entry.size, worker.footprint(job), job.kv_tokens)
        if not self.pool.make_room(worker.needed(job), keep=name):
            return "blocked"
        self.pool.acquire(name)
        request_id = job.request.request_id
        self._owner[request_id] = Owned(name, keep_alive)
        worker.add(job, self.ledger.sink_for(request_id, self._end), load_seconds)
        return "started"

    def end(self, request_id: int, event: Event) -> None:
        self._end(request_id, event)

    def keep_alive(self, name: str, requested: Optional[float]) -> float:
        return self.config.keep_alive_for(name, requested)

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
        self.pool.set_keep_alive(name, self.keep_alive(name, None))
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

    def _workers(self) -> list[Worker]:
        return [worker for entry in self.pool.residents() for worker in entry.model.workers.values()]

    def _step_all(self) -> None:
        generated = 0
        for worker in self._workers():
            if not worker.has_work():
                continue
            try:
                generated += worker.step(self.pacing.now())
            except Exception as exc:  # noqa: BLE001 - a bad step fails that batch, never the thread
                if not self.pacing.contained:
                    raise  # a group whose step failed (a lost rank, most often) no longer agrees: it must restart
                log.exception("decode step failed for %s", worker.name)
                worker.fail_all(InternalError(f"generation failed: {exc}"))
        self._trim_caches(0)
        if generated:
            self._count(steps=self._counters.steps + 1, generated_tokens=self._counters.generated_tokens + generated)

    def _prefill(self) -> None:
        """At most one slice of prompt prefill between decode steps, so running streams keep going."""
        if any(entry.model.joining for entry in self.pool.residents()):
            return  # a sequence that just joined gets its first token before more prefill
        done = self.pacing.prefill(self.prefiller, self._workers(), lambda: not self.intake.empty())
        if done.chunks:
            self._count(
                prefill_tokens=self._counters.prefill_tokens + done.tokens,
                prefill_chunks=self._counters.prefill_chunks + done.chunks,
                prefill_slices=self._counters.prefill_slices + 1,
            )

    def _trim_caches(self, free: int) -> None:
        trim_stored_caches(self.pool, self.budget, self.config.server.prompt_cache_bytes, free)

    # ---- status -------------------------------------------------------------------------------------------

    def _count(self, **changes: object) -> None:
        self._counters = EngineCounters(**{**self._counters.__dict__, **changes})

    def _publish(self) -> None:
        """Replace the status snapshot; after every loop iteration and every request's end."""
        now_active = len(self._owner) + self._waiting.parked
        self._counters = EngineCounters(
            **{
                **self._counters.__dict__,
                "active_requests": now_active,
                "queue_size": len(self._waiting) - self._waiting.parked,
            }
        )
        self.status = engine_status(self.pool, self._counters, self.fatal, self.intake.closed, self.pacing.world())


__all__ = ["Core"]
