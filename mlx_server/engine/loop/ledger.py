"""Every request the inference thread accepted, until its terminal event: where its events go, and who watches.

Kept by the core so that whatever fails — a step, a cleanup, the thread itself — each registered request still
gets exactly one Done or Failed, and so the observer (metrics) sees every event exactly once.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from mlx_server.contract.events import Done, Event, Failed, Sink
from mlx_server.contract.requests import EngineRequest
from mlx_server.contract.status import Observer
from mlx_server.engine.loop.commands import deliver

log = logging.getLogger("mlx_server.engine")


class Ledger:
    def __init__(self) -> None:
        self._sinks: dict[int, Sink] = {}
        self._requests: dict[int, EngineRequest] = {}
        self.observer: Optional[Observer] = None

    def register(self, request: EngineRequest, sink: Sink) -> None:
        self._sinks[request.request_id] = sink
        self._requests[request.request_id] = request

    def sinks(self) -> list[tuple[int, Sink]]:
        return list(self._sinks.items())

    def pop(self, request_id: int, event: Event) -> Optional[Sink]:
        """Forget a request that ends with `event` (observed here); its sink, or None if it had already ended."""
        sink = self._sinks.pop(request_id, None)
        request = self._requests.pop(request_id, None)
        if sink is not None:
            self.observe(request, event)
        return sink

    def sink_for(self, request_id: int, end: Callable[[int, Event], None]) -> Sink:
        """What a worker publishes into: terminal events go through `end`, the rest straight to the client."""

        def sink(event: Event) -> None:
            if isinstance(event, (Done, Failed)):
                end(request_id, event)
            else:
                self.observe(self._requests.get(request_id), event)
                target = self._sinks.get(request_id)
                if target is not None:
                    deliver(target, event)

        return sink

    def observe(self, request: Optional[EngineRequest], event: Event) -> None:
        if self.observer is not None and request is not None:
            try:
                self.observer(request, event)
            except Exception:  # noqa: BLE001 - observability must never break generation
                log.exception("event observer failed")


__all__ = ["Ledger"]
