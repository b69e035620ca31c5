"""Faults stay contained: a failing request, a dead inference thread, a slow reader."""

from __future__ import annotations

import pytest
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
from mlx_lm import load

from support.enginetools import add, until
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.contract.errors import InternalError
from mlx_server.contract.events import Done, Failed
from mlx_server.contract.requests import GenerateRequest, SamplingParams
from support.serving import make_config, serve


def test_exception_in_one_sequence_fails_only_that_request(tiny_llama: Path) -> None:
    runner = GenerateWorker("m", *load(str(tiny_llama)), 2048, max_batch=8)
    events: dict[int, list[Any]] = {1: [], 2: []}
    sp = SamplingParams(temperature=0.0, repeat_penalty=1.2)
    for rid in (1, 2):
        add(runner, GenerateRequest(model="m", prompt=f"prompt {rid}", raw=True, sampling=sp, max_tokens=30,
                                   request_id=rid), events[rid].append)
    for _ in range(3):
        runner.step()

    def broken(tokens: mx.array, logits: mx.array) -> mx.array:
        raise ValueError("grammar state corrupted")

    runner.sequences[runner.by_request[2]].processors.append(broken)
    while runner.has_work():
        runner.step()
    assert isinstance(events[2][-1], Failed) and isinstance(events[2][-1].error, InternalError)
    assert "grammar state corrupted" in events[2][-1].error.message
    assert isinstance(events[1][-1], Done) and events[1][-1].usage.completion_tokens == 30


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_dead_inference_thread_means_503_not_hangs(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"m": {"source": str(tiny_llama)}})) as server:
        lines: list[dict] = []
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{server.url}/api/generate", timeout=30, json={
                    "model": "m", "prompt": "x", "options": {"num_predict": 10**6}}) as r:
                for raw in r.iter_lines():
                    lines.append(json.loads(raw))
                    streaming.set()

        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(30)
        server.engine.core.post(object())  # type: ignore[arg-type]  # kill the inference thread on purpose
        t.join(10)
        assert not t.is_alive() and "error" in lines[-1]  # the in-flight stream ended with an error line
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        start = time.monotonic()
        r = httpx.post(f"{server.url}/api/generate", json={"model": "m", "prompt": "x"}, timeout=10)
        assert r.status_code == 503 and "engine" in r.json()["error"]
        assert time.monotonic() - start < 2
        assert httpx.get(f"{server.url}/api/tags").status_code == 200  # listings still answer


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_slow_reader_does_not_stall_others(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"m": {"source": str(tiny_llama)}})) as server:
        body = json.dumps({"model": "m", "prompt": "slow", "options": {"num_predict": 2000}}).encode()
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        slow.recv(1)  # then read nothing more for a while: its buffers fill up
        try:
            for _ in range(5):
                r = httpx.post(f"{server.url}/api/generate", timeout=30, json={
                    "model": "m", "prompt": "fast", "stream": False, "options": {"num_predict": 50}})
                assert r.status_code == 200 and r.json()["eval_count"] == 50
            assert until(lambda: server.engine.status().counters.active_requests == 0, timeout=20)  # slow one finished too
        finally:
            slow.close()
