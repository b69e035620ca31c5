"""The inference thread cannot be taken down by one request, and when it does die, nobody is left hanging:
every request gets its terminal event, the in-flight count returns to zero, and new requests are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from support.enginetools import control, submit, until
from mlx_server.engine.engine import Engine
from mlx_server.contract.errors import ServiceUnavailable
from mlx_server.contract.events import Done, Failed
from mlx_server.contract.requests import CountTokensRequest, GenerateRequest, LoadRequest, SamplingParams
from support.serving import make_config

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def engine(tiny_llama: Path, tmp_path: Path) -> Iterator[Engine]:
    e = Engine(make_config(tmp_path, {"m": {"source": str(tiny_llama)}}, max_concurrent=1))
    e.start()
    yield e
    e.stop()


def test_a_step_whose_cleanup_raises_fails_its_requests_and_the_thread_lives(engine: Engine) -> None:
    running = submit(engine, "m", max_tokens=100000, sampling=GREEDY)
    running.first_delta()
    runner = engine.core.pool.get("m").model.workers["generate"]  # type: ignore[union-attr]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: the batch is corrupt")

    # Fault injection: the step raises, and so does every cleanup call on the broken batch.
    runner.generator.next = broken
    runner.generator.remove = broken
    end = running.wait()
    assert isinstance(end, Failed) and "injected" in end.error.message
    assert until(lambda: engine.status().in_flight == 0)
    assert engine.status().alive
    assert isinstance(submit(engine, "m", max_tokens=3).wait(), Done)  # a fresh batch serves the next one


def test_a_dead_thread_ends_everything_and_refuses_the_rest(engine: Engine) -> None:
    running = submit(engine, "m", max_tokens=100000, sampling=GREEDY)
    running.first_delta()
    queued = submit(engine, "m", max_tokens=5)  # max_concurrent=1: it waits
    assert until(lambda: engine.status().counters.queue_size == 1)
    engine.core.post("not a command")  # type: ignore[arg-type]  # the bug class that kills the thread
    for waiter in (running, queued):
        end = waiter.wait()
        assert isinstance(end, Failed) and isinstance(end.error, ServiceUnavailable)
    assert until(lambda: not engine.status().alive)
    status = engine.status()
    assert status.in_flight == 0 and status.fatal and "not an engine command" in status.fatal
    for request in (GenerateRequest(model="m", prompt="x"), LoadRequest("m")):
        with pytest.raises(ServiceUnavailable):
            engine.submit(request, lambda e: None)


def test_counting_tokens_never_loads_a_model(engine: Engine) -> None:
    end = control(engine, CountTokensRequest(GenerateRequest(model="m", prompt="count these words"))).wait()
    assert isinstance(end, Done) and end.usage.prompt_tokens > 3
    assert engine.core.pool.names() == [] and engine.status().pool.loads == 0
