"""What reaches the inference thread: the commands posted since its last iteration, from a thread-safe queue."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

from mlx_server.contract.errors import ServiceUnavailable
from mlx_server.engine.loop.commands import Command


class Intake:
    def __init__(self) -> None:
        self._queue: queue.Queue[Command] = queue.Queue()
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

    def take(self, block: bool, expiry: Optional[float], clock: Callable[[], float]) -> list[Command]:
        """The commands that arrived; when `block` (idle), wait for the first: at most a second, or until `expiry`
        (on `clock`: the next keep_alive to run out)."""
        try:
            if block:
                timeout = 1.0 if expiry is None else min(1.0, max(0.0, expiry - clock()))
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


__all__ = ["Intake"]
