"""What a kind of request registers: the requests it serves, how they are prepared (off the inference thread),
and what serves them on a resident model. The façade and the loader read these; the loop never does."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from mlx_server.contract.events import Event
from mlx_server.contract.requests import EngineRequest
from mlx_server.engine.loop.jobs import Job
from mlx_server.engine.model.loader import WorkerFactory
from mlx_server.engine.prepare.stage import Preparer


@dataclass(frozen=True)
class Reply:
    """A request answered by its preparation alone (counting tokens): these events, never the inference thread."""

    events: tuple[Event, ...]


Prepare = Callable[[Preparer, Any], Union[Job, Reply]]


@dataclass(frozen=True)
class Kind:
    name: str
    requests: tuple[type, ...]  # the contract's request types it serves
    prepare: Prepare  # runs in a preparation worker: tokenizing, templating, reading files
    inline: bool = False  # prepare is instant and needs no worker thread
    worker: Optional[WorkerFactory] = None  # makes its worker on a loaded model (None: it needs none)
    accepts: Optional[Callable[[Any], bool]] = None  # which of those requests are its (None: all of them)


def age(request: EngineRequest) -> float:
    """Seconds since the request arrived (Ollama's total_duration counts queueing and loading)."""
    return max(0.0, time.monotonic() - request.created)


__all__ = ["Kind", "Prepare", "Reply", "age"]
