"""The seam between the single-box loop and a distributed group: how an iteration gets its commands, its clock,
its free memory and its prefill.

Alone (`Solo`), commands come straight from the intake queue, time is the injected clock and the prefill
scheduler spends its slice as it sees fit. In a group, engine/distributed/ implements the same protocol: rank 0's
plan carries the commands, the clock and the prefill chunk to every rank. The loop calls the seam and keeps no
distributed state of its own.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Optional, Protocol, Sequence

from mlx_server.contract.status import WorldStatus
from mlx_server.engine.loop.budget import available_memory
from mlx_server.engine.loop.commands import Command
from mlx_server.engine.loop.intake import Intake
from mlx_server.engine.loop.jobs import Worker
from mlx_server.engine.loop.prefill import Prefiller, PrefillResult


class Pacing(Protocol):
    contained: bool  # a failed step or prefill chunk fails its own requests only (a group must restart instead)

    def clock(self) -> float:
        """This iteration's time: keep_alive, ageing, admission order."""
        ...

    def now(self) -> float:
        """time.monotonic's reading for request deadlines (distributed: the plan's, the same on every rank)."""
        ...

    def free(self) -> int:
        """Memory free on the machine (distributed: on the tightest rank)."""
        ...

    def turn(
        self,
        intake: Intake,
        block: bool,
        expiry: Optional[float],
        workers: Callable[[], Sequence[Worker]],
        prefiller: Prefiller,
    ) -> list[Command]:
        """This iteration's commands (waiting for the first, up to `expiry`, when `block`)."""
        ...

    def prefill(
        self, prefiller: Prefiller, workers: Sequence[Worker], interrupted: Callable[[], bool]
    ) -> PrefillResult:
        """This iteration's prefill slice."""
        ...

    def context(self) -> ContextManager[None]:
        """Held around the whole life of the inference thread."""
        ...

    def world(self) -> Optional[WorldStatus]: ...


class Solo:
    """One machine: the intake's commands, the given clock, the scheduler's own slice."""

    contained = True

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock

    def clock(self) -> float:
        return self._clock()

    def now(self) -> float:
        return time.monotonic()

    def free(self) -> int:
        return available_memory()

    def turn(
        self,
        intake: Intake,
        block: bool,
        expiry: Optional[float],
        workers: Callable[[], Sequence[Worker]],
        prefiller: Prefiller,
    ) -> list[Command]:
        return intake.take(block, expiry, self._clock)

    def prefill(
        self, prefiller: Prefiller, workers: Sequence[Worker], interrupted: Callable[[], bool]
    ) -> PrefillResult:
        return prefiller.run(workers, interrupted=interrupted)

    def context(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def world(self) -> Optional[WorldStatus]:
        return None


__all__ = ["Pacing", "Solo"]
