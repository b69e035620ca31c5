"""Driving a real Engine from synchronous tests: submit with a thread-safe sink, wait for the end."""

from __future__ import annotations

import queue
import time
from typing import Any

from mlx_server.engine.loop.prefill import Prefiller
from mlx_server.engine.prepare.stage import prepare_request
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.contract.events import Delta, Done, Event, Failed
from mlx_server.contract.requests import GenerateRequest


class Waiter:
    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.seen: list[Event] = []
        self.ended_at = 0.0  # when the engine published Done / Failed (engine thread's clock reading)

    def __call__(self, event: Event) -> None:
        if isinstance(event, (Done, Failed)):
            self.ended_at = time.monotonic()
        self.events.put(event)

    def wait(self, timeout: float = 60) -> Event:
        """Block until Done or Failed; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(event)
            if isinstance(event, (Done, Failed)):
                return event

    def first_delta(self, timeout: float = 60) -> Delta:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(event)
            if isinstance(event, Delta):
                return event
            assert not isinstance(event, (Done, Failed)), event


def tokens_so_far(w: Waiter) -> int:
    """Tokens `w` has received until now (Deltas can bundle several: partial UTF-8 is held back)."""
    while not w.events.empty():
        w.seen.append(w.events.get_nowait())
    return sum(e.tokens for e in w.seen if isinstance(e, Delta))


def submit(engine: Any, model: str, prompt: str = "hello", **kw: Any) -> Waiter:
    req = GenerateRequest(model=model, prompt=prompt, raw=True, **kw)
    waiter = Waiter(req)
    engine.submit(req, waiter)
    return waiter


def control(engine: Any, request: Any) -> Waiter:
    """Submit a LoadRequest / UnloadRequest / CountTokensRequest."""
    waiter = Waiter(request)
    engine.submit(request, waiter)
    return waiter


def until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def add(runner: GenerateWorker, req: GenerateRequest, sink: Any, load_duration: float = 0.0) -> None:
    """Prepare a request as the preparation stage would, admit it and prefill its prompt whole, so it is in the
    runner's batch (the engine prefills in slices between steps instead)."""
    runner.add(prepare_request(req, runner.tokenizer, runner.context_length), sink, load_duration)
    prefill_all(runner)


def prefill_all(runner: GenerateWorker) -> None:
    prefiller = Prefiller(0.0)
    while runner.prefill_jobs():
        prefiller.run([runner])
