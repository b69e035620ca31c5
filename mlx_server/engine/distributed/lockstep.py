"""Several ranks, one engine: rank 0 decides each loop iteration's step plan, every rank applies it in lockstep.

Only rank 0 serves HTTP. Its inference thread takes the commands that arrived, reads its clock once and picks the
next prefill chunk, and sends that as one typed, versioned StepPlan; every rank (rank 0 too) then runs the same
deterministic engine code on it: admission, decode steps, the planned prefill, loads and evictions. Anything that
depends on time reads the plan's clock, so ranks never disagree on a timeout, a keep_alive or an ageing level.
Sampling is identical everywhere because every rank seeds MLX's generator from the first plan and the sharded
model's logits are reduced with `all_sum` (the same bytes on every rank).

The plan travels the way mlx_lm's server sends its requests, pickled over `mx.distributed.all_sum`, in one
collective per iteration when it is small: every rank writes into its own region of one byte buffer (rank 0 the
plan, each rank its free memory and pid), so one sum hands everyone the plan and the leader every rank's report.
A rank that dies makes the collective raise on the others; one that hangs is caught by a watchdog (engine.py).
"""

from __future__ import annotations

import pickle
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream

from mlx_server.contract.events import Event
from mlx_server.contract.status import RankStatus, WorldStatus
from mlx_server.engine.loop.commands import Admit, Command
from mlx_server.engine.loop.prefill import PrefillChunk
from mlx_server.engine.prepare.stage import Preparer

PLAN_VERSION = 1
INLINE = 4096  # plan bytes carried in the iteration's one collective; a larger plan takes a second one
REPORT = struct.Struct("<qq")  # each rank's region of the header: its free memory bytes, its pid
HEADER = struct.Struct("<qq")  # plan length, plan version


@dataclass(frozen=True)
class StepPlan:
    """What every rank does this iteration. Commands are in wire form: no sinks, grammars compiled per rank."""

    seq: int
    now: float  # rank 0's time.monotonic(): the one clock of this iteration on every rank
    commands: tuple[Command, ...] = ()
    prefill: tuple[PrefillChunk, ...] = ()
    seed: Optional[int] = None  # the first plan only: every rank seeds MLX's random generator with it
    version: int = PLAN_VERSION


def no_sink(event: Event) -> None:
    """The sink of a request on a follower rank: only rank 0 has the client."""


def to_wire(cmd: Command) -> Command:
    if isinstance(cmd, Admit):
        return Admit(cmd.job.wire(), no_sink)
    return cmd


def from_wire(cmd: Command, preparer: Preparer) -> Command:
    """A follower's copy of rank 0's command: its per-rank state made here (grammar processors hold state)."""
    if isinstance(cmd, Admit):
        return Admit(cmd.job.for_rank(preparer), no_sink)
    return cmd


@dataclass
class Lockstep:
    """This process's place in the group, and the plan exchange. Used by the inference thread only, except the
    fields the watchdog reads (busy_since, loading) and the status snapshot."""

    group: mx.distributed.Group
    backend: str
    timeout: float = 20.0  # seconds an iteration may wait on its peers before the group is declared broken
    load_timeout: float = 1800.0  # a sharded load evaluates a whole model between two collectives
    busy_since: Optional[float] = None  # monotonic, while this rank is in an iteration (or waiting for a plan)
    loading: bool = False
    plans: int = 0
    plan_bytes: int = 0
    exchange_seconds: float = 0.0
    last_plan_bytes: int = 0
    largest_plan_bytes: int = 0
    ranks: tuple[RankStatus, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def exchange(self, plan: Optional[StepPlan], free: int, pid: int) -> tuple[StepPlan, list[int]]:
        """Rank 0 passes its plan, the others None; every rank gets the plan and every rank's free memory."""
        tic = time.perf_counter()
        size = self.size
        head = HEADER.size + REPORT.size * size
        payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL) if self.leader else b""
        buf = bytearray(head + INLINE)
        if self.leader:
            HEADER.pack_into(buf, 0, len(payload), PLAN_VERSION)
            buf[head : head + min(len(payload), INLINE)] = payload[:INLINE]
        REPORT.pack_into(buf, HEADER.size + REPORT.size * self.rank, free, pid)
        summed = self._sum(buf)
        length, version = HEADER.unpack_from(summed, 0)
        if version != PLAN_VERSION:
            raise RuntimeError(
                f"rank 0 speaks step plan version {version}, this rank {PLAN_VERSION}: "
                "run the same mlx-server on every rank"
            )
        reports = [REPORT.unpack_from(summed, HEADER.size + REPORT.size * r) for r in range(size)]
        body = bytes(summed[head : head + min(length, INLINE)])
        if length > INLINE:  # rare: many requests admitted at once
            rest = bytearray(length - INLINE)
            if self.leader:
                rest[:] = payload[INLINE:]
            body += bytes(self._sum(rest))
        got: StepPlan = plan if self.leader and plan is not None else pickle.loads(body)
        if got.seed is not None:
            mx.random.seed(got.seed)  # unseeded sampling draws alike on every rank from here on
        now = time.monotonic()
        with self._lock:
            self.plans += 1
            self.plan_bytes += length
            self.last_plan_bytes = length
            self.largest_plan_bytes = max(self.largest_plan_bytes, length)
            self.exchange_seconds += time.perf_counter() - tic
            self.ranks = tuple(
                RankStatus(rank=r, pid=pid_, free_bytes=free_, last_seen=now) for r, (free_, pid_) in enumerate(reports)
            )
        return got, [free_ for free_, _ in reports]

    def _sum(self, buf: bytearray) -> bytearray:
        # uint8 sums of regions only one rank writes (the others send zeros) are that rank's bytes, exactly.
        # mlx's stubs leave out the buffer protocol that mx.array both accepts and provides.
        out = mx.distributed.all_sum(
            mx.array(memoryview(buf), dtype=mx.uint8),  # type: ignore[arg-type]
            group=self.group,
            stream=generation_stream,
        )
        mx.eval(out)
        return bytearray(memoryview(out))  # type: ignore[arg-type]

    def new_seed(self) -> int:
        """Rank 0's random seed, sent in the first plan (each rank's own would differ)."""
        return int(time.time_ns() % 2**32)

    def status(self) -> WorldStatus:
        with self._lock:
            return WorldStatus(
                backend=self.backend,
                size=self.size,
                rank=self.rank,
                ranks=self.ranks,
                plans=self.plans,
                plan_bytes=self.plan_bytes,
                last_plan_bytes=self.last_plan_bytes,
                largest_plan_bytes=self.largest_plan_bytes,
                exchange_seconds=self.exchange_seconds,
            )

    def stuck_for(self, now: float) -> float:
        """Seconds past its allowance this rank has waited inside one iteration (0 when it is fine)."""
        since = self.busy_since
        if since is None:
            return 0.0
        # Loads, and start-up (rank 0 builds its HTTP app before its first plan), take longer than any step.
        limit = self.load_timeout if self.loading or not self.plans else self.timeout
        return max(0.0, now - since - limit)


def init_group(backend: str) -> mx.distributed.Group:
    """Join the group mlx.launch (or mlx.distributed_config's hostfile) set up for this process."""
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() < 2:
        raise RuntimeError(
            "distributed mode needs at least 2 ranks: start it with mlx.launch (see docs/distributed.md)"
        )
    return group


@contextmanager
def one_stream() -> Iterator[None]:
    """Every collective must run in the same order on every rank. BatchGenerator evaluates the next decode step
    asynchronously on mlx_lm's generation stream; a prefill chunk or the plan exchange on another stream would
    interleave its all_sums with that step's. So a rank's inference thread runs all its MLX work on that stream."""
    with mx.stream(generation_stream):
        yield


def all_failed(group: mx.distributed.Group, failed: bool) -> int:
    """A barrier that counts the ranks that failed (this one excluded)."""
    total = mx.distributed.all_sum(mx.array(int(failed)), group=group, stream=generation_stream)
    return int(total.item()) - int(failed)  # type: ignore[arg-type]  # item() of an int array is an int


__all__ = [
    "Lockstep",
    "PLAN_VERSION",
    "PrefillChunk",
    "StepPlan",
    "all_failed",
    "from_wire",
    "init_group",
    "no_sink",
    "one_stream",
    "to_wire",
]
