"""Images through the official clients, unchanged, against a real server on a tiny random-weight LLaVA: the
`ollama` client's chat / generate (and the replaced system's top-level `images`), `openai` chat completions with a
data URL, and `anthropic` messages with a base64 block (and its count_tokens) must all give mlx_vlm's own answer
for the same image and prompt; refusals come back in each dialect's error shape."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from support.serving import Server, make_config, serve
from support.tinyvlm import build_llava, sample_image
from support.vlm_reference import MAX_TOKENS, Reference

SEED = 7
TEXT = "describe"


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    sample_image(seed).save(buf, "PNG")
    return buf.getvalue()


def b64(seed: int) -> str:
    return base64.b64encode(png(seed)).decode()


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava(tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def reference(llava: Path) -> Reference:
    return Reference(llava)


@pytest.fixture(scope="module")
def server(llava: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = {"llava": {"source": str(llava), "aliases": ["llava:7b"]}, "text": {"source": str(tiny_llama)}}
    with serve(make_config(tmp_path_factory.mktemp("cfg"), models)) as running:
        yield running


def test_ollama_chat_generate_and_stream(server: Server, reference: Reference) -> None:
    want, prompt_tokens = reference(SEED, TEXT)
    client = ollama.Client(host=server.url)
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    chat = client.chat(
        model="llava:7b", messages=[{"role": "user", "content": TEXT, "images": [png(SEED)]}], options=options
    )
    assert chat.message.content == want
    assert chat.prompt_eval_count == prompt_tokens  # the image's 16 tokens counted, as Ollama does
    gen = client.generate(model="llava", prompt=TEXT, images=[b64(SEED)], options=options)
    assert gen.response == want
    streamed = "".join(
        part.message.content
        for part in client.chat(
            model="llava",
            messages=[{"role": "user", "content": TEXT, "images": [b64(SEED)]}],
            options=options,
            stream=True,
        )
    )
    assert streamed == want


def test_top_level_images_attach_to_the_last_user_message(server: Server, reference: Reference) -> None:
    """The replaced system's main chat path: `images` beside `messages`, no options."""
    want, _ = reference(SEED, TEXT)
    body = {
        "model": "llava",
        "messages": [{"role": "user", "content": TEXT}],
        "images": [b64(SEED)],
        "stream": False,
        "options": {"temperature": 0, "num_predict": MAX_TOKENS},
    }
    r = httpx.post(f"{server.url}/api/chat", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == want


def test_openai_data_url_and_url_refusal(server: Server, reference: Reference) -> None:
    want, prompt_tokens = reference(SEED, TEXT)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(SEED)}"}},
        {"type": "text", "text": TEXT},
    ]
    reply = client.chat.completions.create(
        model="llava", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=MAX_TOKENS
    )
    assert reply.choices[0].message.content == want
    assert reply.usage is not None and reply.usage.prompt_tokens == prompt_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="llava",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x"}}]}
            ],
        )
    assert "only base64 data URLs are accepted" in str(refused.value)


def test_anthropic_base64_block_and_count_tokens(server: Server, reference: Reference) -> None:
    want, prompt_tokens = reference(SEED, TEXT)
    client = anthropic.Anthropic(base_url=server.url, api_key="x")
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(SEED)}}
    messages = [{"role": "user", "content": [block, {"type": "text", "text": TEXT}]}]
    reply = client.messages.create(
        model="llava", messages=messages, max_tokens=MAX_TOKENS, extra_body={"temperature": 0}
    )
    assert "".join(b.text for b in reply.content if b.type == "text") == want
    # Anthropic's usage counts tokens read from the prompt cache apart (the same image was asked about before).
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) == prompt_tokens
    counted = client.messages.count_tokens(model="llava", messages=messages)
    assert counted.input_tokens == prompt_tokens
    url_block = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="llava", messages=[{"role": "user", "content": [url_block]}], max_tokens=4)
    assert "only base64 data URLs are accepted" in str(refused.value)


def test_capabilities_and_text_model_refusal(server: Server) -> None:
    client = ollama.Client(host=server.url)
    assert "vision" in (client.show("llava").capabilities or [])
    assert "vision" not in (client.show("text").capabilities or [])
    tags = {m["name"]: m for m in httpx.get(f"{server.url}/api/tags").json()["models"]}
    assert "vision" in tags["llava"].get("capabilities", [])
    r = httpx.post(
        f"{server.url}/api/chat",
        json={"model": "text", "messages": [{"role": "user", "content": "hi", "images": [b64(1)]}], "stream": False},
    )
    assert r.status_code == 400
    assert r.json() == {"error": '"text" does not support images'}
    bomb = httpx.post(
        f"{server.url}/api/generate",
        json={"model": "llava", "prompt": "hi", "images": [base64.b64encode(b"GIF89a junk").decode()], "stream": False},
    )
    assert bomb.status_code == 400 and "image" in bomb.json()["error"]
    assert httpx.get(f"{server.url}/health").status_code == 200
