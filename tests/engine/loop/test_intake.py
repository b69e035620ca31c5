"""The intake queue on its own: order, waiting only while idle, and nothing lost when the thread stops."""

from __future__ import annotations

import threading
import time

import pytest

from mlx_server.contract.errors import ServiceUnavailable
from mlx_server.engine.loop.commands import Cancel, Preload, Shutdown
from mlx_server.engine.loop.intake import Intake


def test_commands_come_out_in_the_order_they_went_in() -> None:
    intake = Intake()
    cmds = [Cancel(1), Preload(("a",)), Cancel(2)]
    for c in cmds:
        intake.post(c)
    assert intake.take(block=False, expiry=None, clock=time.monotonic) == cmds
    assert intake.empty() and intake.take(block=False, expiry=None, clock=time.monotonic) == []


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_an_idle_wait_ends_at_the_next_expiry_or_the_first_command() -> None:
    intake = Intake()
    start = time.monotonic()
    assert intake.take(block=True, expiry=start + 0.05, clock=time.monotonic) == []
    assert 0.04 <= time.monotonic() - start < 0.9  # the keep_alive that runs out ends the wait, not the 1 s cap
    threading.Timer(0.05, intake.post, (Shutdown(),)).start()
    assert intake.take(block=True, expiry=None, clock=time.monotonic) == [Shutdown()]


def test_once_closed_it_refuses_commands_and_hands_back_the_untaken() -> None:
    intake = Intake()
    intake.post(Cancel(1))
    assert intake.close() == [Cancel(1)]
    with pytest.raises(ServiceUnavailable):
        intake.post(Cancel(2))
