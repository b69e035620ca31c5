"""The kinds of request the engine serves, one module each; a new kind is a new module and one line here.

Each registers the contract requests it serves, how they are prepared and, when it runs on a resident model,
the worker that serves it there (in this order, which is also the order workers step and prefill in).
"""

from __future__ import annotations

from mlx_server.engine.kinds import control, embed, generate
from mlx_server.engine.kinds.base import Kind, Reply
from mlx_server.engine.model.loader import WorkerFactory

KINDS: tuple[Kind, ...] = (generate.KIND, embed.KIND, control.LOAD, control.UNLOAD, control.COUNT)


def by_request(kinds: tuple[Kind, ...] = KINDS) -> dict[type, Kind]:
    return {request_type: kind for kind in kinds for request_type in kind.requests}


def worker_factories(kinds: tuple[Kind, ...] = KINDS) -> dict[str, WorkerFactory]:
    return {kind.name: kind.worker for kind in kinds if kind.worker is not None}


__all__ = ["KINDS", "Kind", "Reply", "by_request", "worker_factories"]
