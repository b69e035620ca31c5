"""POST /api/pull and DELETE /api/delete against a real server, downloading from a fake Hub on loopback."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import ollama
import pytest

from support.hubtools import point_hub_at
from support.fakehub import FakeHub
from support.serving import Server, free_port, make_config, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("pull-api")
    config = make_config(tmp, {
        "tiny": {"source": "org/tiny", "aliases": ["small"]},
        "ghost": {"source": "org/ghost"},
        "local": {"source": str(tiny_llama)},
        "gone": {"source": "weights/missing.gguf"},
    })
    with serve(config) as s:
        yield s


def pull_lines(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    with server.client() as c, c.stream("POST", "/api/pull", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line.strip()]


def test_pull_streams_per_file_progress_then_the_model_serves(server: Server, online: FakeHub,
                                                               hub_model: Path) -> None:
    lines = pull_lines(server, {"model": "tiny"})
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    progress = [ln for ln in lines if "digest" in ln]
    assert all(ln["status"] == f"pulling {ln['digest'][7:19]}" for ln in progress)
    by_digest: dict[str, list[dict[str, Any]]] = {}
    for ln in progress:
        by_digest.setdefault(ln["digest"], []).append(ln)
    assert len(by_digest) == 4  # config.json, tokenizer.json, tokenizer_config.json, model.safetensors
    weights = hashlib.sha256((hub_model / "model.safetensors").read_bytes()).hexdigest()
    steps = by_digest[f"sha256:{weights}"]
    assert steps[-1]["completed"] == steps[-1]["total"] == (hub_model / "model.safetensors").stat().st_size
    assert len(steps) >= 3 and [s["completed"] for s in steps] == sorted(s["completed"] for s in steps)
    assert all(s[-1]["completed"] == s[-1]["total"] for s in by_digest.values())

    with server.client() as c:
        assert "tiny" in [m["name"] for m in c.get("/api/tags").json()["models"]]
        assert c.post("/api/generate", json={"model": "small"}).json()["done_reason"] == "load"
        assert c.post("/api/generate", json={"model": "tiny", "keep_alive": 0}).json()["done_reason"] == "unload"


def test_pull_without_stream_and_again_downloads_nothing(server: Server, online: FakeHub) -> None:
    with server.client() as c:
        assert c.post("/api/pull", json={"name": "tiny", "stream": False}).json() == {"status": "success"}
        first = list(online.gets)
        r = c.post("/api/pull", json={"model": "tiny:latest", "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}
    assert len(first) == 4 and online.gets == first  # the second pull only asked for the file list


def test_pull_errors(server: Server, online: FakeHub) -> None:
    with server.client() as c:
        r = c.post("/api/pull", json={"model": "nope"})
        assert r.status_code == 404 and r.json()["error"].startswith('model "nope" not found, only models configured')
        assert c.post("/api/pull", json={}).status_code == 400
        r = c.post("/api/pull", json={"model": "ghost", "stream": False})
        assert r.status_code == 500 and "org/ghost not found on the Hugging Face Hub" in r.json()["error"]
        assert c.post("/api/pull", json={"model": "local", "stream": False}).json() == {"status": "success"}
        r = c.post("/api/pull", json={"model": "gone", "stream": False})
        assert r.status_code == 500 and "missing.gguf does not exist" in r.json()["error"]
    lines = pull_lines(server, {"model": "gone"})
    assert lines[0] == {"status": "pulling manifest"} and "does not exist" in lines[-1]["error"]


def test_pull_offline_or_unreachable_says_so(server: Server, hf_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    lines = pull_lines(server, {"model": "tiny"})
    assert "HF_HUB_OFFLINE" in lines[-1]["error"] and "org/tiny" in lines[-1]["error"]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with server.client() as c:
        r = c.post("/api/pull", json={"model": "tiny", "stream": False})
    assert r.status_code == 500
    assert "cannot reach the Hugging Face Hub" in r.json()["error"]


def test_pull_cancelled_by_the_client_stops_and_keeps_finished_files(server: Server, online: FakeHub,
                                                                     hf_cache: Path) -> None:
    online.delay = 0.005  # ~1.7 s for the 21 MB weights: time to hang up halfway
    with server.client() as c, c.stream("POST", "/api/pull", json={"model": "tiny"}) as r:
        for raw in r.iter_lines():
            if raw.strip() and json.loads(raw).get("total", 0) > 20_000_000:
                break  # the weights started; hang up
    time.sleep(2.5)  # the download stops at its next 10 MB chunk
    online.delay = 0.0
    assert [g for g in online.gets if "safetensors" in g] == ["tiny/model.safetensors bytes=0-"]
    snapshots = list((hf_cache / "models--org--tiny" / "snapshots").glob("*/"))
    assert [p.name for p in snapshots[0].iterdir() if p.suffix == ".safetensors"] == []
    before = len(online.gets)
    with server.client() as c:
        assert c.post("/api/pull", json={"model": "tiny", "stream": False}).json() == {"status": "success"}
    # huggingface-hub >= 2 discards a partial file, so the weights start over; finished files are kept.
    assert online.gets[before:] == ["tiny/model.safetensors bytes=0-"]


def test_delete(server: Server, online: FakeHub, hf_cache: Path) -> None:
    with server.client() as c:
        r = c.request("DELETE", "/api/delete", json={"model": "local"})
        assert r.status_code == 400 and "not managed by mlx-server" in r.json()["error"]
        r = c.request("DELETE", "/api/delete", json={"model": "nope"})
        assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found'}
        assert c.request("DELETE", "/api/delete", json={"model": "tiny"}).status_code == 404  # not pulled yet

        assert c.post("/api/pull", json={"model": "tiny", "stream": False}).status_code == 200
        assert c.post("/api/generate", json={"model": "tiny", "keep_alive": -1}).json()["done_reason"] == "load"
        assert [m["name"] for m in c.get("/api/ps").json()["models"]] == ["tiny"]

        r = c.request("DELETE", "/api/delete", json={"model": "tiny"})
        assert r.status_code == 200
        assert c.get("/api/ps").json()["models"] == []
        assert not (hf_cache / "models--org--tiny").exists()
        assert "tiny" not in [m["name"] for m in c.get("/api/tags").json()["models"]]
        r = c.post("/api/generate", json={"model": "tiny"})
        assert r.status_code == 404 and "mlx-server pull tiny" in r.json()["error"]
        assert c.request("DELETE", "/api/delete", json={"name": "tiny"}).status_code == 404


def test_ollama_client_pull_and_delete(server: Server, online: FakeHub) -> None:
    client = ollama.Client(host=server.url)
    parts = list(client.pull("tiny", stream=True))
    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    assert any(p.digest and p.total and p.completed == p.total for p in parts)
    assert client.pull("tiny").status == "success"
    assert client.delete("tiny").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("nope")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("local")
    assert err.value.status_code == 400


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_pull_never_blocks_the_event_loop(server: Server, online: FakeHub) -> None:
    online.delay = 0.003
    with server.client() as c, httpx.Client(base_url=server.url, timeout=5) as other:
        with c.stream("POST", "/api/pull", json={"model": "tiny"}) as r:
            started = time.perf_counter()
            assert other.get("/health").status_code == 200
            assert other.get("/api/version").status_code == 200
            assert time.perf_counter() - started < 0.5
            assert [json.loads(x) for x in r.iter_lines() if x.strip()][-1] == {"status": "success"}
