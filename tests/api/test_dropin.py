"""The request shapes the containers of the replaced system send, exactly as they send them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support.serving import Server, make_config, serve


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("dropin")
    config = make_config(tmp, {
        "coder:7b": {"source": str(tiny_qwen2), "aliases": ["coding", "code", "default"]},
        "general:1b": {"source": str(tiny_llama), "aliases": ["fast", "status_query"]},
    }, default_model="coder:7b", rate_limit_per_minute=40)
    with serve(config) as s:
        yield s


def post(server: Server, path: str, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def test_mlx_style_category_request(server: Server) -> None:
    r = post(server, "/api/generate", {"category": "fast", "prompt": "Status?", "stream": False,
                                       "max_tokens": 7, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["done"] is True
    assert body["model"] == "general:1b" and body["eval_count"] == 7
    assert body["text"] == body["response"] != ""


@pytest.mark.parametrize("category", ["informational", "execution", "complex", "status-query"])
def test_unknown_category_goes_to_the_default_model(server: Server, category: str) -> None:
    body = post(server, "/api/generate", {"category": category, "prompt": "hi", "stream": False,
                                          "max_tokens": 3}).json()
    assert body["model"] == "coder:7b" and body["eval_count"] == 3


def test_no_model_no_category_uses_default(server: Server) -> None:
    body = post(server, "/api/generate", {"prompt": "hi", "stream": False, "max_tokens": 2}).json()
    assert body["model"] == "coder:7b"


def test_explicit_unknown_model_is_still_404(server: Server) -> None:
    r = post(server, "/api/generate", {"model": "informational", "category": "fast", "prompt": "x"})
    assert r.status_code == 404 and r.json() == {"error": 'model "informational" not found'}


def test_options_win_over_top_level(server: Server) -> None:
    body = post(server, "/api/generate", {"model": "fast", "prompt": "x", "stream": False, "max_tokens": 9,
                                          "options": {"num_predict": 4, "temperature": 0}}).json()
    assert body["eval_count"] == 4
    same = [post(server, "/api/generate", {"model": "fast", "prompt": "x", "stream": False, "max_tokens": 6,
                                           "temperature": 0, "top_p": 0.5}).json()["response"] for _ in range(2)]
    assert same[0] == same[1]  # top-level temperature 0 applied: greedy


def test_ollama_style_chat_with_priority_and_history(server: Server) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Status?"}]
    for priority in ("high", "medium", "low", "bogus"):
        r = post(server, "/api/chat", {"model": "coding", "messages": messages, "stream": False,
                                       "keep_alive": "10m", "options": {"num_predict": 3}},
                 headers={"X-Request-Priority": priority})
        assert r.status_code == 200 and r.json()["message"]["role"] == "assistant"
    with httpx.stream("POST", f"{server.url}/api/chat", json={
            "model": "coding", "messages": messages, "stream": True, "images": None,
            "options": {"temperature": 0.2, "top_p": 0.9, "num_predict": 5, "stop": ["\n\n"]}}) as r:
        lines = [json.loads(x) for x in r.iter_lines()]
    assert all("content" in x["message"] for x in lines)
    assert lines[-1]["done"] is True


def test_ollama_style_generate_stream_lines(server: Server) -> None:
    with httpx.stream("POST", f"{server.url}/api/generate", json={
            "model": "code", "prompt": "x", "stream": True,
            "options": {"temperature": 0.1, "top_p": 0.9, "num_predict": 4, "stop": ["###"]}}) as r:
        lines = [json.loads(x) for x in r.iter_lines()]
    assert all("response" in x for x in lines) and lines[-1]["done"] is True


def test_listings_are_never_rate_limited(server: Server) -> None:
    for _ in range(15):
        for path in ("/health", "/api/tags", "/api/ps", "/api/version", "/", "/queue/stats"):
            assert httpx.get(f"{server.url}{path}").status_code == 200
    answers = [post(server, "/api/generate", {"model": "fast", "prompt": "x", "stream": False,
                                              "max_tokens": 1}) for _ in range(45)]
    codes = [r.status_code for r in answers]
    assert 429 in codes and codes[0] == 200
    # The first refusal, not one more request: the bucket refills over time, so a later one may get through.
    refused = next(r for r in answers if r.status_code == 429)
    assert "rate limit" in refused.json()["error"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "healthy"
