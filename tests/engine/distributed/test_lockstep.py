"""The step plan's wire form, on a group of one (the same code path a real group runs, minus the peers)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_server.engine.loop.commands import Admit, Cancel, Preload
from mlx_server.engine.distributed.lockstep import INLINE, Lockstep, StepPlan, from_wire, no_sink, to_wire
from mlx_server.engine.loop.prefill import PrefillChunk
from mlx_server.engine.kinds import generate
from mlx_server.engine.prepare.stage import Preparer
from mlx_server.contract.requests import GenerateRequest
from support.serving import make_config


def test_a_plan_round_trips_with_its_commands_in_wire_form(tiny_llama: Path, tmp_path: Path) -> None:
    preparer = Preparer(make_config(tmp_path, {"m": {"source": str(tiny_llama)}}))
    req = GenerateRequest(model="m", prompt="word " * 3000, raw=True, format="json")
    prepared = generate.prepare(preparer, req)
    assert prepared.grammar  # a compiled grammar: per-rank state that never travels
    seen: list[object] = []
    cmds = (Admit(prepared, seen.append), Cancel(7), Preload(("m",)))
    wire = tuple(to_wire(c) for c in cmds)
    assert wire[0].sink is no_sink and not wire[0].job.grammar and wire[1:] == cmds[1:]

    ls = Lockstep(mx.distributed.init(), "ring")
    plan = StepPlan(seq=0, now=12.5, commands=wire, prefill=(PrefillChunk("m", req.request_id, 64),), seed=3)
    got, frees = ls.exchange(plan, free=1234, pid=99)
    assert got == plan and frees == [1234]
    assert ls.status().largest_plan_bytes > INLINE  # 3,000 tokens: the second collective carried the rest
    assert ls.status().ranks[0].pid == 99

    followed = from_wire(wire[0], preparer)
    assert isinstance(followed, Admit) and followed.job.tokens == prepared.tokens
    assert len(followed.job.grammar) == len(prepared.grammar)  # compiled again on this rank


def test_the_watchdog_allowance(tmp_path: Path) -> None:
    ls = Lockstep(mx.distributed.init(), "ring", timeout=5.0, load_timeout=100.0)
    assert ls.stuck_for(1000.0) == 0.0  # not in an iteration
    ls.busy_since = 0.0
    assert ls.stuck_for(50.0) == 0.0  # before the first plan, start-up gets the long allowance
    ls.plans = 1
    assert ls.stuck_for(50.0) == 45.0
    ls.loading = True
    assert ls.stuck_for(50.0) == 0.0
