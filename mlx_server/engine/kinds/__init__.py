"""The kinds of request the engine serves, one module each; a new kind is a new module and one line here.

Each registers the contract requests it serves, how they are prepared and, when it runs on a resident model,
the worker that serves it there (in this order, which is also the order workers step and prefill in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mlx_server.engine.kinds import control, embed, generate, rerank, vision
from mlx_server.engine.kinds.base import Kind, Reply
from mlx_server.engine.model.loader import WorkerFactory

KINDS: tuple[Kind, ...] = (
    generate.KIND,
    vision.KIND,
    embed.KIND,
    rerank.KIND,
    control.LOAD,
    control.UNLOAD,
    control.COUNT,
)


@dataclass(frozen=True)
class Kinds:
    """Which kind a request is: a kind that claims some requests of a type (`accepts`) comes before the kind
    that takes the rest of that type (vision before generate)."""

    kinds: tuple[Kind, ...] = KINDS

    def of(self, request: Any) -> Optional[Kind]:
        found = [k for k in self.kinds if isinstance(request, k.requests)]
        claimed = next((k for k in found if k.accepts is not None and k.accepts(request)), None)
        return claimed or next((k for k in found if k.accepts is None), None)


def worker_factories(kinds: tuple[Kind, ...] = KINDS) -> dict[str, WorkerFactory]:
    return {kind.name: kind.worker for kind in kinds if kind.worker is not None}


__all__ = ["KINDS", "Kind", "Kinds", "Reply", "worker_factories"]
