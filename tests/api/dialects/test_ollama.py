"""The Ollama API over a real uvicorn server, driven by the official `ollama` client and raw HTTP."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import ollama
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from support.serving import Server, make_config, serve
from support.tinymodels import reference_greedy

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ollama-api")
    config = make_config(tmp, {
        "llama-tiny": {"source": str(tiny_llama), "aliases": ["small"], "options": {"num_predict": 64}},
        "qwen-tiny:1b": {"source": str(tiny_qwen2)},
        "absent": {"source": "org/not-downloaded"},
    })
    with serve(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url)


def mlx_text(model_dir: Path, ids: list[int]) -> str:
    """The text mlx_lm.generate prints for these tokens (its streaming detokenizer, not tokenizer.decode)."""
    detok = load_tokenizer(model_dir).detokenizer
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def chat_tokens(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("model,fixture", [("llama-tiny", "tiny_llama"), ("qwen-tiny:1b", "tiny_qwen2")])
@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_equals_mlx_lm(client: ollama.Client, request: pytest.FixtureRequest, model: str,
                                   fixture: str, stream: bool) -> None:
    path = request.getfixturevalue(fixture)
    # a distinct system prompt per case, so no case reuses another's prompt cache
    messages = [{"role": "system", "content": f"You answer briefly ({'stream' if stream else 'whole'})."},
                {"role": "user", "content": "What is the weather in the valley?"}]
    want = reference_greedy(path, chat_tokens(path, messages), 20)
    expected = mlx_text(path, want)
    options = {**GREEDY, "num_predict": 20}
    if stream:
        parts = list(client.chat(model=model, messages=messages, options=options, stream=True))
        assert all(not p.done for p in parts[:-1]) and parts[-1].done
        assert len(parts) > 5  # streamed as generated, not in one piece
        text = "".join(p.message.content or "" for p in parts)
        final = parts[-1]
    else:
        final = client.chat(model=model, messages=messages, options=options, stream=False)
        text = final.message.content
    assert text == expected
    assert final.eval_count == 20 and final.done_reason == "length"
    # the whole prompt, as Ollama counts it (cache + evaluated), whatever came from the prompt cache
    assert final.prompt_eval_count == len(chat_tokens(path, messages))
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, key), int)
    assert final.total_duration >= final.eval_duration > 0
    dt.datetime.fromisoformat(final.created_at)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_generate_equals_mlx_lm(client: ollama.Client, tiny_llama: Path, stream: bool) -> None:
    prompt = "Describe the old bridge"
    want = reference_greedy(tiny_llama, chat_tokens(tiny_llama, [{"role": "user", "content": prompt}]), 16)
    options = {**GREEDY, "num_predict": 16}
    if stream:
        parts = list(client.generate(model="small", prompt=prompt, options=options, stream=True))
        text = "".join(p.response for p in parts)
    else:
        text = client.generate(model="small", prompt=prompt, options=options, stream=False).response
    assert text == mlx_text(tiny_llama, want)


def test_raw_generate_and_system(client: ollama.Client, tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    want = reference_greedy(tiny_llama, list(tok.encode("Plain text prompt")), 8)
    r = client.generate(model="llama-tiny", prompt="Plain text prompt", raw=True, options={**GREEDY, "num_predict": 8})
    assert r.response == mlx_text(tiny_llama, want)
    msgs = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hello"}]
    want = reference_greedy(tiny_llama, chat_tokens(tiny_llama, msgs), 8)
    r = client.generate(model="llama-tiny", prompt="Hello", system="Be a pirate.", options={**GREEDY, "num_predict": 8})
    assert r.response == mlx_text(tiny_llama, want)


def test_template_field(client: ollama.Client, tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    want = reference_greedy(tiny_llama, list(tok.encode("Q: sky? A:")), 6)
    r = client.generate(model="llama-tiny", prompt="sky?", template="Q: {{ .Prompt }} A:",
                        options={**GREEDY, "num_predict": 6})
    assert r.response == mlx_text(tiny_llama, want)


def test_stop_and_num_predict(client: ollama.Client) -> None:
    base = client.generate(model="llama-tiny", prompt="stop test", options={**GREEDY, "num_predict": 30}).response
    stop = base[10:13]
    r = client.generate(model="llama-tiny", prompt="stop test", options={**GREEDY, "num_predict": 30, "stop": [stop]})
    assert r.response == base[: base.find(stop)] and r.done_reason == "stop"
    parts = list(client.generate(model="llama-tiny", prompt="stop test", stream=True,
                                 options={**GREEDY, "num_predict": 30, "stop": [stop]}))
    assert "".join(p.response for p in parts) == base[: base.find(stop)]


def test_model_options_apply_and_request_overrides(client: ollama.Client) -> None:
    r = client.generate(model="llama-tiny", prompt="defaults", options=GREEDY)
    assert r.eval_count == 64  # per-model options: num_predict 64
    r = client.generate(model="llama-tiny", prompt="defaults", options={**GREEDY, "num_predict": 3})
    assert r.eval_count == 3


def test_seed_reproducible(client: ollama.Client) -> None:
    opts = {"temperature": 1.0, "seed": 1234, "num_predict": 12}
    a = client.generate(model="llama-tiny", prompt="random", options=opts).response
    b = client.generate(model="llama-tiny", prompt="random", options=opts).response
    c = client.generate(model="llama-tiny", prompt="random", options={**opts, "seed": 99}).response
    assert a == b
    assert a != c


def test_unknown_model_404(client: ollama.Client, server: Server) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and err.value.error == 'model "nope" not found'
    r = httpx.post(f"{server.url}/api/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found'}
    # configured but not on disk: 404 that says how to get it, and not listed
    r = httpx.post(f"{server.url}/api/generate", json={"model": "absent", "prompt": "x"})
    assert r.status_code == 404 and "mlx-server pull absent" in r.json()["error"]
    assert "absent" not in [m.model for m in client.list().models]


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompt": "x"}).encode(), "model is required"),
    (json.dumps({"model": "llama-tiny", "prompt": "x", "options": {"temperature": "hot"}}).encode(), "temperature"),
    (json.dumps({"model": "llama-tiny", "prompt": "x", "options": {"num_predict": 1.5}}).encode(), "num_predict"),
    (json.dumps({"model": "llama-tiny", "prompt": "x", "options": {"stop": 5}}).encode(), "stop"),
    (json.dumps({"model": "llama-tiny", "prompt": "x", "keep_alive": "soon"}).encode(), "keep_alive"),
    (json.dumps({"model": "llama-tiny", "prompt": "x", "stream": "yes"}).encode(), "stream"),
    (json.dumps({"model": "llama-tiny", "prompt": 5}).encode(), "prompt"),
    (json.dumps({"model": 7, "prompt": "x"}).encode(), "model"),
])
def test_bad_requests_are_400(server: Server, body: bytes, needle: str) -> None:
    r = httpx.post(f"{server.url}/api/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_unknown_options_are_ignored(client: ollama.Client) -> None:
    r = client.generate(model="llama-tiny", prompt="x", options={**GREEDY, "num_predict": 2, "mirostat": 1,
                                                                  "frobnicate": True})
    assert r.eval_count == 2


def cached_prompt_tokens(server: Server, model: str) -> float:
    wanted = f'mlx_cached_prompt_tokens_total{{model="{model}"}}'
    lines = [ln for ln in httpx.get(f"{server.url}/metrics").text.splitlines() if ln.startswith(wanted)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_follow_up_reuses_the_prompt_cache(client: ollama.Client, server: Server, tiny_qwen2: Path) -> None:
    history = [{"role": "user", "content": "Tell me a long story about the sea and the ships on it."}]
    first = client.chat(model="qwen-tiny:1b", messages=history, options={**GREEDY, "num_predict": 12})
    full = len(chat_tokens(tiny_qwen2, history))
    assert first.prompt_eval_count == full
    history += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "And then?"}]
    before = cached_prompt_tokens(server, "qwen-tiny:1b")
    second = client.chat(model="qwen-tiny:1b", messages=history, options={**GREEDY, "num_predict": 12})
    total = len(chat_tokens(tiny_qwen2, history))
    # the shared prefix came from the cache, and Ollama still counts it: prompt_eval_count is cache + evaluated
    assert cached_prompt_tokens(server, "qwen-tiny:1b") - before >= full - 1
    assert second.prompt_eval_count == total
    want = reference_greedy(tiny_qwen2, chat_tokens(tiny_qwen2, history), 12)
    assert second.message.content == mlx_text(tiny_qwen2, want)  # same answer as without a cache


def test_ndjson_wire_format(server: Server) -> None:
    with httpx.stream("POST", f"{server.url}/api/chat", json={
            "model": "llama-tiny", "messages": [{"role": "user", "content": "hi"}],
            "options": {**GREEDY, "num_predict": 6}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        raw = b"".join(r.iter_raw())
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1])  # one object per line, no blank lines
    objs = [json.loads(x) for x in lines[:-1]]
    assert [o["done"] for o in objs] == [False] * (len(objs) - 1) + [True]
    assert objs[-1]["done_reason"] == "length" and objs[-1]["eval_count"] == 6


def test_load_only_and_unload_only(client: ollama.Client, server: Server) -> None:
    r = httpx.post(f"{server.url}/api/generate", json={"model": "qwen-tiny:1b"}).json()
    assert r["done"] is True and r["done_reason"] == "load" and r["response"] == ""
    assert "qwen-tiny:1b" in [m.model for m in client.ps().models]
    r = httpx.post(f"{server.url}/api/chat", json={"model": "qwen-tiny:1b", "messages": [], "keep_alive": 0}).json()
    assert r["done_reason"] == "unload" and r["message"] == {"role": "assistant", "content": ""}
    assert "qwen-tiny:1b" not in [m.model for m in client.ps().models]


def test_keep_alive_zero_unloads_after_request(client: ollama.Client) -> None:
    client.generate(model="qwen-tiny:1b", prompt="x", options={"num_predict": 2}, keep_alive=0)
    assert "qwen-tiny:1b" not in [m.model for m in client.ps().models]
    client.generate(model="qwen-tiny:1b", prompt="x", options={"num_predict": 2}, keep_alive="1h")
    [ps] = [m for m in client.ps().models if m.model == "qwen-tiny:1b"]
    remaining = ps.expires_at - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(minutes=59) < remaining <= dt.timedelta(hours=1)


def test_listing_endpoints(client: ollama.Client, server: Server) -> None:
    assert httpx.get(server.url).text == "Ollama is running"
    assert httpx.head(server.url).status_code == 200
    assert httpx.get(f"{server.url}/api/version").json()["version"].count(".") == 2
    listed = httpx.get(f"{server.url}/api/tags").json()["models"]
    assert {(m["name"], m["model"]) for m in listed} == {("llama-tiny", "llama-tiny"), ("qwen-tiny:1b", "qwen-tiny:1b"),
                                                         ("small", "small")}  # aliases listed as themselves
    assert all(m["exists"] is True for m in listed)
    models = {m.model: m for m in client.list().models}
    m = models["qwen-tiny:1b"]
    assert m.size > 0 and m.digest and m.details.family == "qwen2" and m.modified_at.tzinfo is not None
    show = client.show("small")
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == 2048
    assert "tools" in show.capabilities and "<|im_start|>" in show.template
    client.generate(model="llama-tiny", prompt="warm", options={"num_predict": 1})
    ps = {m.model: m for m in client.ps().models}
    assert ps["llama-tiny"].size_vram == ps["llama-tiny"].size > 0
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404


def test_root_json_and_queue_stats(server: Server) -> None:
    body = httpx.get(server.url, headers={"accept": "application/json"}).json()
    assert body["status"] == "running" and set(body["available_models"]) == {"llama-tiny", "qwen-tiny:1b"}
    stats = httpx.get(f"{server.url}/queue/stats").json()
    assert set(stats) == {"active_requests", "max_concurrent", "queue_size", "stats"}
    assert set(stats["stats"]["by_priority"]) == {"HIGH", "MEDIUM", "LOW"}
    before = stats["stats"]["by_priority"]["HIGH"]
    httpx.post(f"{server.url}/api/generate", headers={"X-Request-Priority": "high"},
               json={"model": "llama-tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}})
    after = httpx.get(f"{server.url}/queue/stats").json()
    assert after["stats"]["by_priority"]["HIGH"] == before + 1


def test_disconnect_mid_stream_cancels_in_engine(server: Server) -> None:
    engine = server.engine
    before = engine.status().counters.cancelled
    with httpx.stream("POST", f"{server.url}/api/generate", json={
            "model": "llama-tiny", "prompt": "go on forever", "options": {"num_predict": 100000}}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
    deadline = time.monotonic() + 5
    while engine.status().counters.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.status().counters.cancelled == before + 1
    assert engine.status().counters.active_requests == 0
    entry = engine.core.pool.get("llama-tiny")
    assert entry.active == 0 and not entry.model.has_work()


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_health_is_instant(server: Server) -> None:
    t = time.perf_counter()
    r = httpx.get(f"{server.url}/health")
    assert time.perf_counter() - t < 0.5
    assert r.status_code == 200 and r.json()["status"] == "healthy"


def test_generation_models_embed(client: ollama.Client, tiny_llama: Path) -> None:
    """Ollama's behaviour: a generation model embeds too — one unit vector of its hidden width per input, the
    same batched as alone (the MLX embedders themselves are checked against a reference in tests/engine)."""
    width = json.loads((tiny_llama / "config.json").read_text())["hidden_size"]
    texts = ["the river bends", "a much longer sentence about the old stone bridge"]
    batch = client.embed(model="llama-tiny", input=texts)
    vectors = np.array(batch.embeddings)
    assert vectors.shape == (2, width) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert batch.prompt_eval_count > 0
    for text, vector in zip(texts, vectors):
        alone = np.array(client.embed(model="llama-tiny", input=text).embeddings[0])
        assert float(alone @ vector) >= 0.9999
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nope", input="x")
    assert err.value.status_code == 404
