"""Host check, API key, CORS and body limits on a real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import ollama
import pytest

from support.serving import make_config, serve


def test_host_header_check(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"m": {"source": str(tiny_llama)}}, allowed_hosts=["mlx.example.lan"])) as s:
        for host in ("localhost", "127.0.0.1:11435", "[::1]:80", "host.docker.internal", "gpu.internal:1",
                     "mlx.example.lan"):
            assert httpx.get(f"{s.url}/api/version", headers={"host": host}).status_code == 200, host
        for host in ("evil.com", "127.0.0.1.evil.com", "internal", "attacker.internal.evil.com"):
            r = httpx.get(f"{s.url}/api/tags", headers={"host": host})
            assert r.status_code == 403 and "host not allowed" in r.json()["error"], host


def test_api_key_everywhere_but_health(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"m": {"source": str(tiny_llama)}}, api_key="s3cret")) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        for path in ("/api/tags", "/api/version", "/", "/metrics", "/api/ps"):
            r = httpx.get(f"{s.url}{path}")
            assert r.status_code == 401 and "API key" in r.json()["error"], path
            assert r.headers["x-served-by"] == "mlx-server"
        assert httpx.get(f"{s.url}/api/tags", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{s.url}/api/tags", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{s.url}/api/tags", headers={"x-api-key": "s3cret"}).status_code == 200
        client = ollama.Client(host=s.url, headers={"Authorization": "Bearer s3cret"})
        assert client.generate(model="m", prompt="x", options={"num_predict": 2}).done
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=s.url).list()
        assert err.value.status_code == 401


def test_cors_defaults_to_local_origins(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"m": {"source": str(tiny_llama)}})) as s:
        ok = httpx.options(f"{s.url}/api/chat", headers={"origin": "http://localhost:3000",
                                                         "access-control-request-method": "POST"})
        assert ok.headers.get("access-control-allow-origin") == "http://localhost:3000"
        bad = httpx.options(f"{s.url}/api/chat", headers={"origin": "https://evil.example",
                                                          "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in bad.headers


def test_body_and_json_limits(tiny_llama: Path, tmp_path: Path) -> None:
    with serve(make_config(tmp_path, {"m": {"source": str(tiny_llama)}}, max_body_bytes="64KiB")) as s:
        big = json.dumps({"model": "m", "prompt": "x" * 100_000}).encode()
        r = httpx.post(f"{s.url}/api/generate", content=big)
        assert r.status_code == 413 and "larger than" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must hold for a streamed body too
            yield b'{"model": "m", "prompt": "'
            for _ in range(100):
                yield b"y" * 1000
            yield b'"}'

        r = httpx.post(f"{s.url}/api/generate", content=chunks())
        assert r.status_code == 413
        deep = b'{"model": "m", "prompt": "x", "options": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        r = httpx.post(f"{s.url}/api/generate", content=deep)
        assert r.status_code == 400 and "error" in r.json()
        r = httpx.post(f"{s.url}/api/generate", json={"model": "m", "prompt": "x", "stream": False,
                                                      "options": {"num_predict": 10**12, "num_ctx": 10**12}, "shift": False}, timeout=120)
        assert r.status_code == 200 and r.json()["eval_count"] <= 2048  # bounded by the model's context
        assert httpx.get(f"{s.url}/health").json()["status"] == "healthy"
