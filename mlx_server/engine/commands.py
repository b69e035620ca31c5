"""What crosses the queue into the inference thread: typed commands only (never tuples or sentinels).

Generations arrive already prepared (tokenized, fitted, grammar compiled); loads and unloads arrive as the
contract's own request types. Everything else the inference thread needs is in these messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Union

from mlx_server.engine.prepare import Prepared, PreparedEmbed
from mlx_server.types import Event, LoadRequest, UnloadRequest

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
