"""What reaches the inference thread each loop iteration: the commands posted since the last one and, when the engine
runs distributed, the step plan that carries those same commands (and the iteration's clock) to every rank."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from mlx_server.engine.loop.commands import Command
from mlx_server.engine.distributed.lockstep import Lockstep, StepPlan, from_wire, to_wire
from mlx_server.engine.loop.budget import available_memory
from mlx_server.engine.loop.prefill import PrefillChunk
from mlx_server.engine.prepare.stage import Preparer
from mlx_server.contract.errors import ServiceUnavailable


@dataclass
class Turn:
    """One iteration's input. Distributed, `now`, `free` and `prefill` come from rank 0's step plan."""

    commands: list[Command] = field(default_factory=list)
    now: float = 0.0
    free: int = 0  # the tightest rank's free memory
    prefill: tuple[PrefillChunk, ...] = ()


class Intake:
    def __init__(self, lockstep: Optional[Lockstep] = None, preparer: Optional[Preparer] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lockstep = lockstep
        self.clock = clock  # the thread's own clock (distributed: rank 0's, before it goes into the plan)
        self._preparer = preparer
        self._queue: "queue.Queue[Command]" = queue.Queue()
        self._lock = threading.Lock()
        self.closed = False  # set once, under _lock, when the thread stops taking commands

    def post(self, cmd: Command) -> None:
        """Queue a command; raises ServiceUnavailable once the thread has stopped (nothing is left behind)."""
        with self._lock:
            if self.closed:
                raise ServiceUnavailable("inference engine is not running")
            self._queue.put(cmd)

    def close(self) -> list[Command]:
        """Take no more commands; returns those never taken, for the caller to end."""
        with self._lock:
            self.closed = True
        return self._rest([])

    def empty(self) -> bool:
        return self._queue.empty()

    def turn(self, block: bool, expiry: Optional[float],
             plan_prefill: Callable[[], tuple[PrefillChunk, ...]]) -> Turn:
        """The commands that arrived; when `block` (idle), wait for the first: at most a second, or until `expiry`
        (the next keep_alive to run out). Distributed, rank 0 sends them in this iteration's step plan and the
        other ranks take theirs from it."""
        ls = self.lockstep
        if ls is None:
            return Turn(self._take(block, expiry))
        cmds: list[Command] = []
        plan: Optional[StepPlan] = None
        if ls.leader:
            ls.busy_since = None  # an idle wait for requests is not a stuck group
            cmds = self._take(block, expiry)
            ls.busy_since = time.monotonic()
            plan = StepPlan(seq=ls.plans, now=time.monotonic(), commands=tuple(to_wire(c) for c in cmds),
                            prefill=plan_prefill(), seed=ls.new_seed() if ls.plans == 0 else None)
        else:
            ls.busy_since = time.monotonic()
        got, frees = ls.exchange(plan, available_memory(), os.getpid())
        if not ls.leader:
            assert self._preparer is not None
            cmds = [from_wire(c, self._preparer) for c in got.commands]
        return Turn(cmds, got.now, min(frees), got.prefill)

    def _take(self, block: bool, expiry: Optional[float]) -> list[Command]:
        try:
            if block:
                timeout = 1.0 if expiry is None else min(1.0, max(0.0, expiry - self.clock()))
                first = self._queue.get(timeout=timeout)
            else:
                first = self._queue.get_nowait()
        except queue.Empty:
            return []
        return self._rest([first])

    def _rest(self, cmds: list[Command]) -> list[Command]:
        """`cmds` and every command queued behind them, without waiting."""
        while True:
            try:
                cmds.append(self._queue.get_nowait())
            except queue.Empty:
                return cmds


__all__ = ["Intake", "Turn"]
