"""Ollama's newer request fields over a real uvicorn server, with the official `ollama` client and raw HTTP:
`logprobs` / `top_logprobs`, `think` levels, and `/api/tags` entries whose `model` is their `name`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import mlx.core as mx
import numpy as np
import ollama
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.contract.requests import ChatMessage, GenerateRequest
from mlx_server.engine.prepare.prompt import prompt_text
from support.serving import Server, make_config, serve
from support.tiny_templates import CHATML_TEMPLATE
from support.tinymodels import build_tokenizer, reference_greedy

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
ASK = [{"role": "user", "content": "What lies beyond the river?"}]

# ChatML whose generation prompt states the reasoning effort the way gpt-oss's template does (`reasoning_effort`,
# "medium" when the caller passes none).
_GENERATION = "{%- if add_generation_prompt -%}"
EFFORT_TEMPLATE = (
    CHATML_TEMPLATE[: CHATML_TEMPLATE.index(_GENERATION)]
    + _GENERATION
    + '{{- "<|im_start|>assistant\\nReasoning: " + (reasoning_effort if reasoning_effort is defined else "medium")'
    + ' + "\\n" -}}{%- endif -%}\n'
)


@pytest.fixture(scope="module")
def effort_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama's weights with EFFORT_TEMPLATE: a model whose template takes a reasoning effort."""
    dst = tmp_path_factory.mktemp("effort") / "model"
    shutil.copytree(tiny_llama, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = EFFORT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def server(tiny_llama: Path, effort_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("ollama-fields"), {
        "llama-tiny": {"source": str(tiny_llama), "aliases": ["small", "tiny:latest"]},
        "effort": {"source": str(effort_model)},
    })
    with serve(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url)


def chat_tokens(model_dir: Path, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return list(tok.encode(text, add_special_tokens=False))


def mlx_text(model_dir: Path, prompt: list[int], steps: int) -> str:
    """What mlx_lm generates greedily from `prompt`, as its streaming detokenizer prints it."""
    detok = load_tokenizer(model_dir).detokenizer
    for t in reference_greedy(model_dir, prompt, steps):
        detok.add_token(t)
    detok.finalize()
    return detok.text


def reference_logprobs(model_dir: Path, prompt: list[int], steps: int, top: int) -> list[tuple[str, float, list]]:
    """Greedy decoding by mlx_lm itself: per token its text, its logprob and the `top` best (text, logprob)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(str(model_dir))
    out = []
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=steps):
        token = int(token)
        if token in tokenizer.eos_token_ids:
            break
        row = np.array(logprobs.astype(mx.float32))
        best = np.argsort(-row)[:top]
        out.append((tokenizer.decode([token]), float(row[token]),
                    [(tokenizer.decode([int(i)]), float(row[i])) for i in best]))
    return out


def post_lines(server: Server, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed reply's NDJSON objects."""
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1])
    return [json.loads(x) for x in lines[:-1]]


def check_shape(entries: list[dict[str, Any]], top: int) -> None:
    """Ollama's api.Logprob: token, logprob, bytes (the token's UTF-8), and top_logprobs only when asked for."""
    for e in entries:
        assert set(e) == ({"token", "logprob", "bytes", "top_logprobs"} if top else {"token", "logprob", "bytes"})
        assert e["bytes"] == list(e["token"].encode()) and e["logprob"] <= 0
        if top:
            assert len(e["top_logprobs"]) == top
            for t in e["top_logprobs"]:
                assert set(t) == {"token", "logprob", "bytes"} and t["bytes"] == list(t["token"].encode())


def same_logprobs(got: list[dict[str, Any]], want: list[tuple[str, float, list]], tol: float) -> None:
    assert [e["token"] for e in got] == [w[0] for w in want]
    assert [e["logprob"] for e in got] == pytest.approx([w[1] for w in want], abs=tol)
    for e, w in zip(got, want, strict=True):
        tops = e.get("top_logprobs", [])
        assert [t["token"] for t in tops] == [t[0] for t in w[2]]
        assert [t["logprob"] for t in tops] == pytest.approx([t[1] for t in w[2]], abs=tol)


# ---- logprobs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_mlx_lm_and_the_openai_route(client: ollama.Client, server: Server, tiny_llama: Path,
                                                         stream: bool) -> None:
    messages = [{"role": "system", "content": f"Answer ({'stream' if stream else 'whole'})."}, *ASK]
    want = reference_logprobs(tiny_llama, chat_tokens(tiny_llama, messages), 8, 3)
    options = {**GREEDY, "num_predict": 8}
    if stream:
        parts = list(client.chat(model="llama-tiny", messages=messages, options=options, stream=True,
                                 logprobs=True, top_logprobs=3))
        got = [lp.model_dump(exclude_none=True) for p in parts for lp in (p.logprobs or [])]
        text = "".join(p.message.content or "" for p in parts)
        assert len(parts) > 2 and parts[-1].done and parts[-1].logprobs is None
    else:
        r = client.chat(model="llama-tiny", messages=messages, options=options, logprobs=True, top_logprobs=3)
        got = [lp.model_dump(exclude_none=True) for lp in r.logprobs or []]
        text = r.message.content
    same_logprobs(got, want, 1e-3)  # mlx_lm, unbatched: float noise only
    assert text == mlx_text(tiny_llama, chat_tokens(tiny_llama, messages), 8)
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in got)  # greedy took the likeliest
    # The OpenAI route on the same server reports the same numbers for the same request.
    openai = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "llama-tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True,
        "top_logprobs": 3}).json()["choices"][0]["logprobs"]["content"]
    same_logprobs(got, [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
                        for e in openai], 1e-4)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_wire_shape_streamed_and_whole(server: Server, tiny_llama: Path, path: str) -> None:
    prompt = f"Tell me of the hills ({path})"
    body: dict[str, Any] = {"model": "llama-tiny", "options": {**GREEDY, "num_predict": 6}, "logprobs": True,
                            "top_logprobs": 2}
    body.update({"messages": [{"role": "user", "content": prompt}]} if path == "/api/chat" else {"prompt": prompt})
    whole = httpx.post(f"{server.url}{path}", json={**body, "stream": False}, timeout=60).json()
    # beside message / response, as Ollama's ChatResponse and GenerateResponse carry it
    assert "logprobs" not in whole.get("message", {}) and len(whole["logprobs"]) == whole["eval_count"] == 6
    check_shape(whole["logprobs"], 2)
    want = reference_logprobs(tiny_llama, chat_tokens(tiny_llama, [{"role": "user", "content": prompt}]), 6, 2)
    same_logprobs(whole["logprobs"], want, 1e-3)

    lines = post_lines(server, path, body)
    assert "logprobs" not in lines[-1] and lines[-1]["done"] is True
    streamed = [e for o in lines[:-1] for e in o.get("logprobs", [])]
    assert all("logprobs" in o for o in lines[:-1])  # every token's chunk carries its own
    check_shape(streamed, 2)
    same_logprobs(streamed, [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
                             for e in whole["logprobs"]], 1e-4)


def test_without_top_logprobs_only_the_chosen_token(server: Server) -> None:
    r = httpx.post(f"{server.url}/api/generate", timeout=60, json={
        "model": "llama-tiny", "prompt": "one token each", "stream": False, "logprobs": True,
        "options": {**GREEDY, "num_predict": 4}}).json()
    assert len(r["logprobs"]) == 4
    check_shape(r["logprobs"], 0)


@pytest.mark.parametrize("extra", [{}, {"logprobs": False}, {"top_logprobs": 5},
                                   {"logprobs": False, "top_logprobs": 5}])
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_no_logprobs_unless_asked(server: Server, path: str, extra: dict[str, Any]) -> None:
    """Ollama returns logprobs only with logprobs true; top_logprobs alone is validated and otherwise ignored."""
    body: dict[str, Any] = {"model": "llama-tiny", "options": {**GREEDY, "num_predict": 3}, **extra}
    body.update({"messages": ASK} if path == "/api/chat" else {"prompt": "quiet"})
    whole = httpx.post(f"{server.url}{path}", json={**body, "stream": False}, timeout=60).json()
    assert "logprobs" not in whole and whole["eval_count"] == 3
    assert all("logprobs" not in o for o in post_lines(server, path, body))


@pytest.mark.parametrize("field,value,needle", [
    ("top_logprobs", 21, "top_logprobs must be between 0 and 20"),
    ("top_logprobs", -1, "top_logprobs must be between 0 and 20"),
    ("top_logprobs", "3", '"top_logprobs"'),
    ("top_logprobs", 2.5, '"top_logprobs"'),
    ("top_logprobs", True, '"top_logprobs"'),
    ("logprobs", "yes", '"logprobs"'),
    ("logprobs", 1, '"logprobs"'),
    ("think", "extreme", '"think"'),
    ("think", 1, '"think"'),
])
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_bad_values_are_400_naming_the_field(server: Server, path: str, field: str, value: Any,
                                             needle: str) -> None:
    body: dict[str, Any] = {"model": "llama-tiny", "logprobs": True}
    body[field] = value
    body.update({"messages": ASK} if path == "/api/chat" else {"prompt": "x"})
    for stream in (False, True):
        r = httpx.post(f"{server.url}{path}", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and needle in r.json()["error"]


def test_the_official_client_reports_the_same_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama-tiny", prompt="x", logprobs=True, top_logprobs=99)
    assert err.value.status_code == 400 and "top_logprobs" in err.value.error


# ---- think levels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level,effort", [("low", "low"), ("high", "high"), ("max", "high")])
def test_a_level_reaches_a_template_that_takes_an_effort(client: ollama.Client, effort_model: Path, level: str,
                                                         effort: str) -> None:
    expected = chat_tokens(effort_model, ASK, enable_thinking=True, reasoning_effort=effort)
    assert expected != chat_tokens(effort_model, ASK, enable_thinking=True)  # the level changes the prompt
    r = client.chat(model="effort", messages=ASK, think=level, options={**GREEDY, "num_predict": 10})
    assert r.prompt_eval_count == len(expected)
    assert r.message.content == mlx_text(effort_model, expected, 10)  # generated from that very prompt


def test_true_and_false_leave_the_effort_to_the_template(client: ollama.Client, effort_model: Path) -> None:
    for think in (True, False):
        expected = chat_tokens(effort_model, ASK, enable_thinking=think)
        r = client.chat(model="effort", messages=ASK, think=think, options={**GREEDY, "num_predict": 1})
        assert r.prompt_eval_count == len(expected)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_a_level_is_true_for_other_models(server: Server, path: str) -> None:
    """A template without an effort sees only enable_thinking=True: the same prompt and reply as think: true."""
    def ask(think: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": "llama-tiny", "think": think, "stream": False,
                                "options": {**GREEDY, "num_predict": 8}}
        body.update({"messages": ASK} if path == "/api/chat" else {"prompt": "Which road?"})
        r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    yes = ask(True)
    for level in ("low", "medium", "high"):
        got = ask(level)
        assert got["prompt_eval_count"] == yes["prompt_eval_count"]
        assert got.get("message", got.get("response")) == yes.get("message", yes.get("response"))


def test_prompt_passes_the_level_as_reasoning_effort(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, chat_template=EFFORT_TEMPLATE)
    tok = load_tokenizer(tmp_path)

    def text(**fields: Any) -> str:
        return prompt_text(GenerateRequest(model="m", messages=[ChatMessage("user", "hi")], **fields), tok, "m")

    assert text(think=True, think_level="high").endswith("<|im_start|>assistant\nReasoning: high\n")
    assert text(think=True, think_level="low").endswith("Reasoning: low\n")
    assert text(think=True).endswith("Reasoning: medium\n")  # no level: the template's own default
    assert text().endswith("Reasoning: medium\n")


# ---- /api/tags -----------------------------------------------------------------------------------------------


def test_every_tags_entry_is_its_own_model(client: ollama.Client, server: Server) -> None:
    listed = httpx.get(f"{server.url}/api/tags").json()["models"]
    assert all(m["model"] == m["name"] for m in listed)
    names = {m["name"] for m in listed}
    assert names == {"llama-tiny", "effort", "small", "tiny:latest"}
    by_model = {m.model: m for m in client.list().models}  # how llm-ollama keys them: aliases no longer fold
    assert set(by_model) == names
    assert by_model["small"].digest == by_model["llama-tiny"].digest  # still the same weights
