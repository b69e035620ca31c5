"""Fallback to a real Ollama: a second mlx-server (it speaks Ollama) is the upstream, a front proxies to it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from mlx_server.api.fallback import merge_models
from support.serving import Server, free_port, make_config, serve

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
HI = [{"role": "user", "content": "Tell me about the sea"}]


@pytest.fixture(scope="module")
def upstream(tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("upstream"), {
        "up-qwen": {"source": str(tiny_qwen2)},
        "shared": {"source": str(tiny_qwen2)},  # the front serves another model under this name
        "big": {"source": str(tiny_llama)},
    })
    with serve(config) as s:
        yield s


@pytest.fixture(scope="module")
def front(upstream: Server, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("front"), {
        "llama-tiny": {"source": str(tiny_llama)},
        "shared": {"source": str(tiny_llama)},
    }, fallback_url=upstream.url)
    with serve(config) as s:
        yield s


def test_list_shows_both_servers_and_ours_win(front: Server) -> None:
    models = {m.model: m for m in ollama.Client(host=front.url).list().models}
    assert set(models) == {"llama-tiny", "shared", "up-qwen", "big"}
    assert models["shared"].details.family == "llama"  # ours, not the upstream's qwen2
    r = httpx.get(f"{front.url}/api/tags")
    assert r.headers["x-served-by"] == "mlx-server" and int(r.headers["content-length"]) == len(r.content)


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_model_chat_and_generate(front: Server, upstream: Server, stream: bool) -> None:
    via_front, direct = ollama.Client(host=front.url), ollama.Client(host=upstream.url)
    options = {**GREEDY, "num_predict": 12}

    def chat(client: ollama.Client) -> str:
        if stream:
            return "".join(p.message.content or "" for p in client.chat(model="up-qwen", messages=HI,
                                                                           options=options, stream=True))
        return client.chat(model="up-qwen", messages=HI, options=options).message.content or ""

    def generate(client: ollama.Client) -> str:
        if stream:
            return "".join(p.response for p in client.generate(model="up-qwen", prompt="sea", options=options,
                                                               stream=True))
        return client.generate(model="up-qwen", prompt="sea", options=options).response

    assert chat(via_front) == chat(direct) != ""
    assert generate(via_front) == generate(direct) != ""
    for path, body in (("/api/chat", {"messages": HI}), ("/api/generate", {"prompt": "sea"})):
        r = httpx.post(f"{front.url}{path}", json={"model": "up-qwen", "stream": stream, "options": options, **body})
        assert r.status_code == 200 and r.headers["x-served-by"] == "ollama"
    show = httpx.post(f"{front.url}/api/show", json={"name": "up-qwen"})
    assert show.headers["x-served-by"] == "ollama" and show.json()["model_info"]["general.architecture"] == "qwen2"


def test_ours_served_here_including_name_clash(front: Server, upstream: Server) -> None:
    before = upstream.engine.status().counters.total_processed
    for model in ("llama-tiny", "shared"):
        r = httpx.post(f"{front.url}/api/chat", json={"model": model, "messages": HI, "stream": False,
                                                       "options": {**GREEDY, "num_predict": 4}})
        assert r.status_code == 200 and r.headers["x-served-by"] == "mlx-server"
    assert upstream.engine.core.pool.get("shared") is None  # the clash never reached the upstream
    assert upstream.engine.status().counters.total_processed == before
    r = httpx.get(f"{front.url}/health")
    assert r.status_code == 200 and r.headers["x-served-by"] == "mlx-server"
    # no model field (an MLX-style request): never proxied, our own 400
    r = httpx.post(f"{front.url}/api/generate", json={"prompt": "x"})
    assert r.status_code == 400 and r.headers["x-served-by"] == "mlx-server"


def test_without_fallback_unknown_model_is_our_404(upstream: Server) -> None:
    r = httpx.post(f"{upstream.url}/api/chat", json={"model": "nope", "messages": HI})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found'}
    assert r.headers["x-served-by"] == "mlx-server"


def test_stream_passes_through_incrementally_and_disconnect_cancels_upstream(front: Server,
                                                                             upstream: Server) -> None:
    engine = upstream.engine
    cancelled = engine.status().counters.cancelled
    with httpx.stream("POST", f"{front.url}/api/generate", timeout=30, json={
            "model": "up-qwen", "prompt": "go on forever", "options": {"num_predict": 100000}}) as r:
        assert r.headers["x-served-by"] == "ollama"
        assert r.headers["content-type"].startswith("application/x-ndjson")
        first = json.loads(next(r.iter_lines()))
        # the upstream is still generating: the first line was passed on, not held until the end. The status
        # snapshot is published after the loop turn in which that first token went out, so it may lag it a little.
        assert first["done"] is False
        deadline = time.monotonic() + 5
        while engine.status().counters.active_requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.status().counters.active_requests > 0
        assert engine.core.pool.get("up-qwen").active > 0
    deadline = time.monotonic() + 10
    while engine.status().counters.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.status().counters.cancelled == cancelled + 1  # our client left, so the upstream stopped generating


@pytest.fixture
def black_hole() -> Iterator[str]:
    """Accepts connections (the kernel does) and never answers: the slow way for an upstream to be down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_upstream_down(black_hole: str, tiny_llama: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"llama-tiny": {"source": str(tiny_llama)}}, fallback_url=black_hole,
                         request_timeout="1s", max_body_bytes="4KB")
    with serve(config) as s:
        for _ in range(2):  # the second listing is answered from the cached failure
            t = time.perf_counter()
            r = httpx.get(f"{s.url}/api/tags", timeout=10)
            assert time.perf_counter() - t < 2
            assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == ["llama-tiny"]
        t = time.perf_counter()
        assert httpx.get(f"{s.url}/api/tags").status_code == 200 and time.perf_counter() - t < 0.5
        want = f'model "nope" is not served here and the fallback at {black_hole} is unreachable'
        r = httpx.post(f"{s.url}/api/chat", json={"model": "nope", "messages": HI}, timeout=10)
        assert r.status_code == 502 and r.json() == {"error": want}
        assert r.headers["x-served-by"] == "mlx-server"
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=s.url).generate(model="nope", prompt="x")
        assert err.value.status_code == 502 and err.value.error == want
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "nope", "messages": HI}, timeout=10)
        assert r.status_code == 502
        assert r.json()["error"]["message"] == want and r.json()["error"]["type"] == "server_error"
        r = httpx.post(f"{s.url}/v1/messages", json={"model": "nope", "max_tokens": 8, "messages": HI}, timeout=10)
        assert r.status_code == 502 and r.json()["error"]["message"] == want and r.json()["type"] == "error"
        r = httpx.post(f"{s.url}/api/generate", json={"model": "nope", "prompt": "x" * 5000})
        assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.fixture
def doomed_upstream(tiny_qwen2: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An upstream in its own process, so the test can kill it mid-stream."""
    config = make_config(tmp_path, {"up-qwen": {"source": str(tiny_qwen2)}})
    port = free_port()
    with open(tmp_path / "upstream.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_server", "--config", str(config.path),
                                 "--log-level", "warning", "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/version", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "upstream.log").read_text()
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.timeout(90)
def test_upstream_dies_mid_stream(doomed_upstream: tuple[str, Any], tmp_path: Path) -> None:
    url, proc = doomed_upstream
    (tmp_path / "front").mkdir()
    with serve(make_config(tmp_path / "front", {}, fallback_url=url)) as s:
        with httpx.stream("POST", f"{s.url}/api/generate", timeout=20, json={
                "model": "up-qwen", "prompt": "go on", "options": {"num_predict": 100000}}) as r:
            assert r.headers["x-served-by"] == "ollama"
            lines = r.iter_lines()
            assert json.loads(next(lines))["done"] is False
            proc.kill()
            rest = [json.loads(x) for x in lines]  # ends (no hang, no exception) after the upstream died
    assert rest and "error" in rest[-1] and "mid-stream" in rest[-1]["error"]
    assert all(not x.get("done") for x in rest)


def _sse_dies(url: str, proc: Any, dialect: str) -> None:
    """Start an SSE stream through `url`, kill the upstream after its first event, drain with the SDK."""
    if dialect == "openai":
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        chunks = iter(oa.chat.completions.create(model="up-qwen", messages=HI, max_tokens=100000, stream=True))
        assert next(chunks).choices[0].delta.role == "assistant"
        proc.kill()
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            list(chunks)
    else:
        an = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
        with an.messages.stream(model="up-qwen", messages=HI, max_tokens=100000) as stream:
            events = iter(stream)
            assert next(events).type == "message_start"
            proc.kill()
            with pytest.raises(anthropic.APIStatusError, match="failed mid-stream"):
                list(events)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_upstream_dies_mid_sse_stream(doomed_upstream: tuple[str, Any], tmp_path: Path, dialect: str) -> None:
    # SSE clients need an error event too: a stream that just stops looks like a complete answer
    url, proc = doomed_upstream
    (tmp_path / "front").mkdir()
    with serve(make_config(tmp_path / "front", {}, fallback_url=url)) as s:
        _sse_dies(s.url, proc, dialect)


@pytest.mark.parametrize("when_busy", [True, False])
def test_refused_for_memory_goes_to_upstream(upstream: Server, tiny_llama: Path, tmp_path: Path,
                                             when_busy: bool) -> None:
    config = make_config(tmp_path, {"big": {"source": str(tiny_llama)}, "only-here": {"source": str(tiny_llama)}},
                         memory_budget="1KB", fallback_url=upstream.url, fallback_when_busy=when_busy)
    options = {**GREEDY, "num_predict": 8}
    with serve(config) as s:
        r = httpx.post(f"{s.url}/api/generate", json={"model": "big", "prompt": "x", "stream": False,
                                                       "options": options}, timeout=30)
        # the upstream lacks this one: its 404 would hide why we refused, so the client gets our 503
        lonely = httpx.post(f"{s.url}/api/chat", json={"model": "only-here", "messages": HI}, timeout=30)
    assert lonely.status_code == 503 and "memory budget" in lonely.json()["error"]
    assert lonely.headers["x-served-by"] == "mlx-server"
    if not when_busy:
        assert r.status_code == 503 and "memory budget" in r.json()["error"]
        assert r.headers["x-served-by"] == "mlx-server"
        return
    direct = httpx.post(f"{upstream.url}/api/generate", json={"model": "big", "prompt": "x", "stream": False,
                                                               "options": options}, timeout=30)
    assert r.status_code == 200 and r.headers["x-served-by"] == "ollama"
    assert r.json()["response"] == direct.json()["response"]


def test_refused_and_upstream_down_keeps_our_503(tiny_llama: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"big": {"source": str(tiny_llama)}}, memory_budget="1KB",
                         fallback_url=f"http://127.0.0.1:{free_port()}", fallback_when_busy=True)
    with serve(config) as s:
        r = httpx.post(f"{s.url}/api/chat", json={"model": "big", "messages": HI}, timeout=10)
    assert r.status_code == 503 and "memory budget" in r.json()["error"]
    assert r.headers["x-served-by"] == "mlx-server"


def test_openai_listing_merge() -> None:
    ours = [{"id": "llama-tiny", "object": "model"}]
    theirs = [{"id": "llama-tiny", "object": "model", "owned_by": "ollama"}, {"id": "qwen3:8b"},
              {"id": "alias-here"}, "junk"]
    merged = merge_models(ours, theirs, ("id",), lambda n: n == "alias-here")
    assert merged == [{"id": "llama-tiny", "object": "model"}, {"id": "qwen3:8b"}]


def test_openai_models_listing_live(front: Server) -> None:
    r = httpx.get(f"{front.url}/v1/models")
    assert r.status_code == 200 and r.headers["x-served-by"] == "mlx-server"
    ids = [m["id"] for m in r.json()["data"]]
    assert "llama-tiny" in ids and ids.count("shared") == 1


def test_openai_sse_stream_proxied(front: Server) -> None:
    body = {"model": "up-qwen", "messages": HI, "stream": True, "max_tokens": 6, "temperature": 0}
    with httpx.stream("POST", f"{front.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["x-served-by"] == "ollama"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [x for x in r.iter_lines() if x.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(events) > 2
