"""What crosses the queue into the inference thread: typed commands only (never tuples or sentinels).

Every request arrives as one `Admit` of its prepared job (tokenized, fitted, grammar compiled; or a load or an
unload): everything the inference thread needs is in these messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Union

from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Event, Failed, Sink
from mlx_server.engine.loop.jobs import Job

log = logging.getLogger("mlx_server.engine")


@dataclass(frozen=True)
class Admit:
    job: Job
    sink: Sink  # thread-safe: the engine calls it from the inference thread


@dataclass(frozen=True)
class Cancel:
    request_id: int


@dataclass(frozen=True)
class Preload:
    """Load these models in the background, in order, stopping at the first that would not fit the budget."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Union[Admit, Cancel, Preload, Shutdown]


def deliver(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:  # noqa: BLE001 - a broken listener is that request's problem only
        log.exception("delivering %s failed", type(event).__name__)


def fail_untaken(cmds: Iterable[Command], error: MlxServerError) -> None:
    """End the requests of commands the inference thread never registered (so nothing else will end them)."""
    for cmd in cmds:
        if isinstance(cmd, Admit):
            deliver(cmd.sink, Failed(cmd.job.request.request_id, error))
