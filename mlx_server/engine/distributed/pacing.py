"""The loop's seam (engine/loop/pacing.py) for a distributed group: every iteration runs on rank 0's step plan.

Rank 0 takes the commands that arrived, reads its clock once and picks the next prefill chunk; the plan carries
them to every rank (rank 0 too), so each runs the same admission, steps, prefill and evictions at the same time.
"""

from __future__ import annotations

import os
import time
from typing import Callable, ContextManager, Optional, Sequence

from mlx_server.contract.status import WorldStatus
from mlx_server.engine.distributed.lockstep import Lockstep, StepPlan, from_wire, one_stream, to_wire
from mlx_server.engine.loop.budget import available_memory
from mlx_server.engine.loop.commands import Command
from mlx_server.engine.loop.intake import Intake
from mlx_server.engine.loop.jobs import Worker
from mlx_server.engine.loop.prefill import PrefillChunk, Prefiller, PrefillResult
from mlx_server.engine.prepare.stage import Preparer


class LockstepPacing:
    """Implements engine.loop.pacing.Pacing for one rank of a group."""

    contained = False  # a failed step or chunk means the ranks no longer agree: the group must restart

    def __init__(self, lockstep: Lockstep, preparer: Preparer) -> None:
        self.lockstep = lockstep
        self._preparer = preparer  # followers compile their own grammars for rank 0's requests
        self._now = 0.0  # the plan's clock
        self._free = 0  # the tightest rank's free memory, from the plan exchange
        self._planned: tuple[PrefillChunk, ...] = ()

    def clock(self) -> float:
        return self._now

    def now(self) -> float:
        return self._now

    def free(self) -> int:
        return self._free

    def turn(
        self,
        intake: Intake,
        block: bool,
        expiry: Optional[float],
        workers: Callable[[], Sequence[Worker]],
        prefiller: Prefiller,
    ) -> list[Command]:
        ls = self.lockstep
        cmds: list[Command] = []
        plan: Optional[StepPlan] = None
        if ls.leader:
            ls.busy_since = None  # an idle wait for requests is not a stuck group
            cmds = intake.take(block, expiry, time.monotonic)
            ls.busy_since = time.monotonic()
            plan = StepPlan(
                seq=ls.plans,
                now=time.monotonic(),
                commands=tuple(to_wire(c) for c in cmds),
                prefill=prefiller.plan(workers()),
                seed=ls.new_seed() if ls.plans == 0 else None,
            )
        else:
            ls.busy_since = time.monotonic()
        got, frees = ls.exchange(plan, available_memory(), os.getpid())
        if not ls.leader:
            cmds = [from_wire(c, self._preparer) for c in got.commands]
        self._now, self._free, self._planned = got.now, min(frees), got.prefill
        return cmds

    def prefill(
        self, prefiller: Prefiller, workers: Sequence[Worker], interrupted: Callable[[], bool]
    ) -> PrefillResult:
        planned, self._planned = self._planned, ()
        return prefiller.apply(workers, planned)

    def context(self) -> ContextManager[None]:
        return one_stream()

    def world(self) -> Optional[WorldStatus]:
        return self.lockstep.status()


__all__ = ["LockstepPacing"]
