"""What crosses the queue into the inference thread: typed commands only (never tuples or sentinels).

Generations arrive already prepared (tokenized, fitted, grammar compiled); loads and unloads arrive as the
contract's own request types. Everything else the inference thread needs is in these messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Union

from mlx_server.engine.prepare.stage import Prepared, PreparedEmbed
from mlx_server.contract.errors import MlxServerError
from mlx_server.contract.events import Event, Failed
from mlx_server.contract.requests import LoadRequest, UnloadRequest

log = logging.getLogger("mlx_server.engine")

Sink = Callable[[Event], None]


@dataclass(frozen=True)
class Admit:
    prepared: Union[Prepared, PreparedEmbed]
    sink: Sink  # thread-safe: the engine calls it from the inference thread


@dataclass(frozen=True)
class Control:
    request: Union[LoadRequest, UnloadRequest]
    sink: Sink


@dataclass(frozen=True)
class Cancel:
    request_id: int
    reason: Literal["cancelled", "timeout"] = "cancelled"


@dataclass(frozen=True)
class Preload:
    """Load these models in the background, in order, stopping at the first that would not fit the budget."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Union[Admit, Control, Cancel, Preload, Shutdown]


def request_id_of(cmd: Admit | Control) -> int:
    return cmd.prepared.request.request_id if isinstance(cmd, Admit) else cmd.request.request_id


def deliver(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:  # noqa: BLE001 - a broken listener is that request's problem only
        log.exception("delivering %s failed", type(event).__name__)


def fail_untaken(cmds: Iterable[Command], error: MlxServerError) -> None:
    """End the requests of commands the inference thread never registered (so nothing else will end them)."""
    for cmd in cmds:
        if isinstance(cmd, (Admit, Control)):
            deliver(cmd.sink, Failed(request_id_of(cmd), error))
