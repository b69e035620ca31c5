"""Prompts longer than the context window, handled as each real API does (issue 23, part 2), on a real server whose
model has a 96-token window: OpenAI and Anthropic refuse them with their own 400, Ollama's chat drops the oldest
messages whole (system messages and the latest kept) or refuses with `truncate: false`, the Responses API
follows its `truncation`; a reply the window ends is reported as such; count_tokens agrees with the message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from support.serving import Server, make_config, serve

WINDOW = 96
NATIVE = 2048  # the tiny model's max_position_embeddings
LONG = "word " * 150
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("window")
    config = make_config(tmp, {"small": {"source": str(tiny_llama), "context_length": WINDOW},
                               "wide": {"source": str(tiny_llama), "context_length": 2 * NATIVE}})
    with serve(config) as s:
        yield s


def test_openai_refuses_an_over_long_prompt(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": LONG}], max_tokens=4)
    body: Any = err.value.body
    assert body["code"] == "context_length_exceeded" and f"maximum context length is {WINDOW} tokens" in body["message"]


def test_anthropic_refuses_with_the_count_count_tokens_gives(server: Server) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    messages: Any = [{"role": "user", "content": LONG}]
    counted = client.messages.count_tokens(model="small", messages=messages).input_tokens
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="small", messages=messages, max_tokens=32000, timeout=60)
    body: Any = err.value.body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == f"prompt is too long: {counted} tokens > {WINDOW} maximum"


def test_anthropic_reports_a_reply_the_window_ended(server: Server) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    messages: Any = [{"role": "user", "content": "Tell me a story."}]
    counted = client.messages.count_tokens(model="small", messages=messages).input_tokens
    m = client.messages.create(model="small", messages=messages, max_tokens=32000, extra_body=GREEDY, timeout=60)
    assert m.stop_reason == "model_context_window_exceeded"  # not max_tokens: 32,000 were allowed
    assert counted == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    assert m.usage.output_tokens == WINDOW - counted
    short = client.messages.create(model="small", messages=messages, max_tokens=3, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens"


def _kept_by_ollamas_rule(tiny_llama: Path, messages: list[dict[str, str]]) -> int:
    """Prompt tokens after Ollama's chatPrompt rule: drop the oldest messages one by one (system ones stay, the last
    always stays) until the prompt is shorter than the window."""
    tok = load_tokenizer(tiny_llama)

    def count(turns: list[dict[str, str]]) -> int:
        text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    for start in range(len(messages)):
        turns = [m for m in messages[:start] if m["role"] == "system"] + messages[start:]
        if count(turns) < WINDOW or start == len(messages) - 1:
            return count(turns)
    raise AssertionError("unreachable")


def test_ollama_chat_drops_the_oldest_messages_whole(server: Server, tiny_llama: Path) -> None:
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(8):
        messages += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"a{i} " * 3}]
    messages.append({"role": "user", "content": "last question"})
    body = {"model": "small", "messages": messages, "stream": False, "options": {**GREEDY, "num_predict": 2}}
    r = httpx.post(f"{server.url}/api/chat", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] == _kept_by_ollamas_rule(tiny_llama, messages)
    refused = httpx.post(f"{server.url}/api/chat", json={**body, "truncate": False}, timeout=60)
    assert refused.status_code == 400 and "prompt is too long" in refused.json()["error"]


def test_ollama_shifts_the_context_unless_told_not_to(server: Server) -> None:
    body = {"model": "small", "prompt": "Tell me a story.", "stream": False, "options": {**GREEDY, "num_predict": 150}}
    stopped = httpx.post(f"{server.url}/api/generate", json={**body, "shift": False}, timeout=120).json()
    assert stopped["done_reason"] == "length"
    assert stopped["prompt_eval_count"] + stopped["eval_count"] == WINDOW
    shifted = httpx.post(f"{server.url}/api/generate", json=body, timeout=120).json()
    assert shifted["eval_count"] > stopped["eval_count"]  # it went on past the full window
    assert shifted["response"].startswith(stopped["response"])  # the same until the window filled
    streamed = httpx.post(f"{server.url}/api/generate", json={**body, "stream": True}, timeout=120)
    chunks = [json.loads(line) for line in streamed.text.splitlines() if line]
    assert "".join(c.get("response", "") for c in chunks) == shifted["response"]
    bad = httpx.post(f"{server.url}/api/generate", json={**body, "shift": "yes"}, timeout=60)
    assert bad.status_code == 400 and "shift" in bad.json()["error"]


def test_responses_follow_truncation(server: Server) -> None:
    body = {"model": "small", "input": [{"role": "user", "content": "older " * 60}, {"role": "user", "content": "hi"}],
            "max_output_tokens": 2}
    refused = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    cut = httpx.post(f"{server.url}/v1/responses", json={**body, "truncation": "auto"}, timeout=60)
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["input_tokens"] < WINDOW


def test_a_context_length_above_native_is_honoured_everywhere(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    from mlx_server.cli import main

    r = httpx.post(f"{server.url}/api/generate", json={"model": "wide", "prompt": "hi", "stream": False,
                                                       "options": {"num_predict": 1}}, timeout=60)
    assert r.status_code == 200
    ps = {m["name"]: m for m in httpx.get(f"{server.url}/api/ps").json()["models"]}
    show = httpx.post(f"{server.url}/api/show", json={"model": "wide"}).json()["model_info"]
    assert ps["wide"]["context_length"] == 2 * NATIVE == next(v for k, v in show.items() if k.endswith(".context_length"))
    assert main(["check-config", str(server.app.state.ctx.config.path)]) == 0
    assert f"context_length {2 * NATIVE} is above its native {NATIVE}" in capsys.readouterr().out
