"""Speculative decoding seen from outside, on a real server with the official `ollama` client: the same greedy
answer as the undrafted model, Ollama's draft_num_predict per request, the /metrics counters, /api/ps naming
the draft, and a bad draft_num_predict refused."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import ollama
import pytest

from support.serving import Server, make_config, serve

GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24}
PROMPT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("speculative-api")
    config = make_config(tmp, {
        "coder": {"source": str(tiny_llama), "draft": "coder-draft"},
        "coder-draft": {"source": str(tiny_llama)},  # identical weights: every draft is accepted
        "plain": {"source": str(tiny_llama)},
    })
    with serve(config) as s:
        yield s


def counter(server: Server, name: str, model: str) -> float:
    wanted = f'{name}_total{{model="{model}"}}'
    lines = [ln for ln in httpx.get(f"{server.url}/metrics").text.splitlines() if ln.startswith(wanted)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_drafted_answers_equal_plain_and_are_counted(server: Server) -> None:
    client = ollama.Client(host=server.url)
    plain = client.generate(model="plain", prompt=PROMPT, options=GREEDY)
    before = counter(server, "mlx_server_draft_tokens", "coder")
    drafted = client.generate(model="coder", prompt=PROMPT, options={**GREEDY, "draft_num_predict": 3})
    assert drafted.response == plain.response and drafted.eval_count == plain.eval_count
    tokens = counter(server, "mlx_server_draft_tokens", "coder") - before
    assert tokens > 0
    assert counter(server, "mlx_server_draft_accepted", "coder") == counter(server, "mlx_server_draft_tokens", "coder")

    off = counter(server, "mlx_server_draft_tokens", "coder")
    undrafted = client.generate(model="coder", prompt=PROMPT + "#", options={**GREEDY, "draft_num_predict": 0})
    assert undrafted.eval_count == 24
    assert counter(server, "mlx_server_draft_tokens", "coder") == off  # 0 turns drafting off for that request

    ps = httpx.get(f"{server.url}/api/ps").json()["models"]
    assert {m["name"]: m.get("draft") for m in ps}["coder"] == "coder-draft"


def test_a_negative_draft_num_predict_is_400(server: Server) -> None:
    r = httpx.post(f"{server.url}/api/generate",
                   json={"model": "coder", "prompt": "x", "options": {"draft_num_predict": -1}})
    assert r.status_code == 400
    assert "draft_num_predict" in r.json()["error"]
