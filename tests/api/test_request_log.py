"""The log says why (issue 25, part 2), on a real server and engine: the access line names the model, a request
that ends by disconnect logs what it did, every 4xx logs its reason at INFO, and pulling a name that is not
configured says how to add it."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support.serving import Server, make_config, serve


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("request-log")
    with serve(make_config(tmp, {"tiny": {"source": str(tiny_llama)}})) as s:
        yield s


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_the_access_line_names_the_model(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mlx_server"):
        r = httpx.post(f"{server.url}/api/generate", timeout=60,
                       json={"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        # The access line is written once the response is sent, which can be just after the client has it.
        for _ in range(100):
            access = lines(caplog, "mlx_server.fallback")
            found = [ln for ln in access if ln.startswith("POST /api/generate model=tiny ")]
            if found:
                break
            time.sleep(0.02)
    assert r.status_code == 200
    assert found


def test_a_disconnected_stream_logs_what_it_did(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "tiny", "prompt": "tell me everything", "options": {"num_predict": 500, "temperature": 0}}
    with caplog.at_level(logging.INFO, logger="mlx_server"):
        with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                if line and not json.loads(line)["done"]:
                    seen += 1
                if seen == 16:
                    break  # the client goes away
        for _ in range(200):  # the server notices the hang-up within a step
            found = [ln for ln in lines(caplog, "mlx_server.api") if "status=disconnected" in ln]
            if found:
                break
            time.sleep(0.05)
    [logged] = found
    fields = dict(re.findall(r"(\w+)=([^\s]+)", logged))
    assert int(fields["prompt"]) > 0 and int(fields["generated"]) >= 16
    assert float(fields["ttft"].rstrip("s")) > 0


def test_every_4xx_logs_its_reason(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mlx_server.api"):
        assert httpx.post(f"{server.url}/api/generate", json={"model": "ghost", "prompt": "x"}).status_code == 404
        assert httpx.post(f"{server.url}/api/chat", json={"model": "tiny", "messages": 5}).status_code == 400
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "→ 4" in r.getMessage()]
    assert any('404 model "ghost" not found' in m for m in infos)
    assert any("POST /api/chat → 400" in m and "messages" in m for m in infos)


def test_pulling_an_unconfigured_name_says_how_to_add_it(server: Server) -> None:
    r = httpx.post(f"{server.url}/api/pull", json={"model": "llama3.2:1b", "stream": False})
    assert r.status_code == 404
    message = r.json()["error"]
    assert message.startswith('model "llama3.2:1b" not found')
    assert "only models configured in" in message and "ollama:NAME" in message and "restart" in message
