"""Images from every dialect into the engine contract, over a FakeEngine: what the engine receives for each shape.

The contract (contract/requests.py): an image is a string (base64, a data: URL, or an http(s) URL the engine may
refuse), on GenerateRequest.images in prompt mode and on ChatMessage.images in chat mode; `[img]` in a message's
content marks where its next image goes, and Ollama's `[img-N]` stays as the user wrote it. The dialects only
check the JSON shape: decoding, fetching and refusing images for a text model are the engine's.
"""

from __future__ import annotations

import base64
from typing import Any, Iterator

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest

from mlx_server.api.openapi import request_schema
from mlx_server.contract.requests import ChatMessage, CountTokensRequest, GenerateRequest
from support.fakeengine import FakeEngine, fake_model
from support.serving import Server, make_config, serve

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5Erk"
                       "Jggg==")
B64 = base64.b64encode(PNG).decode()  # a 1×1 PNG, as Ollama's `images` carry it
OTHER = base64.b64encode(b"GIF89a" + bytes(16)).decode()
DATA = f"data:image/png;base64,{B64}"
URL = "https://example.com/cat.png"
VISION = {"vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8}}
TOOLS_TEMPLATE = "{% if tools %}{{ tools }}{% endif %}{{ messages }}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("images")
    plain = fake_model(tmp / "plain", "{{ messages }}")
    seer = fake_model(tmp / "seer", "{{ messages }}", **VISION)
    tooly_seer = fake_model(tmp / "tooly-seer", TOOLS_TEMPLATE, **VISION)
    config = make_config(tmp, {
        "plain": {"source": str(plain)},
        "seer": {"source": str(seer)},
        "tooly-seer": {"source": str(tooly_seer)},
        "declared": {"source": str(plain), "kind": "vision"},  # models.yaml says so, whatever the files say
        "text-only": {"source": str(seer), "kind": "generation"},  # a vision checkpoint served as text
    })
    with serve(config, engine=FakeEngine()) as s:
        yield s


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=10)


def generation(engine: FakeEngine) -> GenerateRequest:
    req = engine.last
    assert isinstance(req, GenerateRequest), req
    return req


def messages_of(engine: FakeEngine) -> list[ChatMessage]:
    return generation(engine).messages or []


def error_text(r: httpx.Response) -> str:
    err = r.json()["error"]
    return err if isinstance(err, str) else err["message"]


# ---- Ollama -------------------------------------------------------------------------------------------------------


def test_ollama_generate_images_go_to_the_request(server: Server, engine: FakeEngine) -> None:
    # the official client base64-encodes raw bytes itself
    ollama.Client(host=server.url).generate(model="seer", prompt="what is in [img-0]?", images=[PNG])
    req = generation(engine)
    assert req.images == [B64] and req.prompt == "what is in [img-0]?" and req.messages is None
    assert post(server, "/api/generate", {"model": "seer", "prompt": "x", "stream": False,
                                          "images": []}).status_code == 200
    assert generation(engine).images is None  # an empty list is no images


def test_ollama_chat_images_stay_on_their_messages(server: Server, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "compare [img-1] with", "images": [B64, OTHER]},
                {"role": "assistant", "content": "which?"},
                {"role": "user", "content": "this one", "images": [B64]}]
    ollama.Client(host=server.url).chat(model="seer", messages=messages)
    got = messages_of(engine)
    assert [m.images for m in got] == [[B64, OTHER], None, [B64]]
    assert got[0].content == "compare [img-1] with"  # the user's own tags are the engine's to place


def test_ollama_top_level_images_join_the_last_user_message(server: Server, engine: FakeEngine) -> None:
    body = {"model": "seer", "stream": False, "images": [OTHER],
            "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "second", "images": [B64]},
                         {"role": "assistant", "content": "partial"}]}
    assert post(server, "/api/chat", body).status_code == 200
    assert [m.images for m in messages_of(engine)] == [None, None, [B64, OTHER], None]
    r = post(server, "/api/chat", {**body, "messages": [{"role": "system", "content": "be brief"}]})
    assert r.status_code == 400 and "last user message" in r.json()["error"]
    # no messages at all is a load request (Ollama's), whatever else the body carries
    assert post(server, "/api/chat", {**body, "messages": []}).json()["done_reason"] == "load"


@pytest.mark.parametrize("path,body,field", [
    ("/api/generate", {"prompt": "x", "images": B64}, '"images"'),
    ("/api/generate", {"prompt": "x", "images": [1]}, '"images"'),
    ("/api/generate", {"prompt": "x", "images": [{"data": B64}]}, '"images"'),
    ("/api/generate", {"images": {"0": B64}}, '"images"'),  # checked even when nothing is generated
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": B64}]}, '"messages[0].images"'),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": [None]}]}, '"messages[0].images"'),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "images": 5}, '"images"'),
])
def test_ollama_bad_image_shapes_are_400(server: Server, engine: FakeEngine, path: str, body: dict[str, Any],
                                         field: str) -> None:
    r = post(server, path, {"model": "seer", "stream": False, **body})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"] and "array of base64-encoded image strings" in r.json()["error"]
    assert engine.requests == []


# ---- OpenAI -------------------------------------------------------------------------------------------------------


def test_openai_image_parts_become_tagged_images(server: Server, engine: FakeEngine) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    content: Any = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": DATA}},
                    {"type": "text", "text": " with "},
                    {"type": "image_url", "image_url": {"url": URL, "detail": "low"}}, {"type": "text", "text": "."}]
    oa.chat.completions.create(model="seer", messages=[{"role": "user", "content": content}])
    [msg] = messages_of(engine)
    # http URLs are handed on unchanged: the engine fetches allowed hosts only and refuses the rest
    assert msg.content == "Compare [img] with [img]." and msg.images == [DATA, URL]


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": DATA},  # the legacy bare-string form
    {"type": "input_image", "image_url": DATA},  # Responses-style
    {"type": "input_image", "image_url": {"url": DATA}},
])
def test_openai_other_image_part_forms(server: Server, engine: FakeEngine, part: dict[str, Any]) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [part, {"type": "input_text", "text": "what is it?"}]}]
    assert post(server, "/v1/chat/completions", {"model": "seer", "messages": messages}).status_code == 200
    system, user = messages_of(engine)
    assert system.images is None
    assert user.content == "[img]what is it?" and user.images == [DATA]


@pytest.mark.parametrize("part,needle", [
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio content parts"),
    ({"type": "file", "file": {"file_id": "f1"}}, "file content parts"),
    ({"type": "image_url", "image_url": {"detail": "low"}}, "messages[0].content[0]: an image_url part needs"),
    ({"type": "image_url", "image_url": 7}, "image_url part needs"),
    ({"type": "input_image", "file_id": "file-1"}, "file_id is not supported"),
])
def test_openai_unusable_parts_are_400(server: Server, engine: FakeEngine, part: dict[str, Any],
                                       needle: str) -> None:
    r = post(server, "/v1/chat/completions", {"model": "seer", "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400 and needle in error_text(r), r.text
    assert engine.requests == []


# ---- Anthropic ----------------------------------------------------------------------------------------------------

BASE64_BLOCK = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}}
URL_BLOCK = {"type": "image", "source": {"type": "url", "url": URL}}


def test_anthropic_image_blocks_become_tagged_images(server: Server, engine: FakeEngine) -> None:
    an = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    content: Any = [{"type": "text", "text": "What is "}, BASE64_BLOCK, {"type": "text", "text": " and "},
                    URL_BLOCK, {"type": "text", "text": "?"}]
    an.messages.create(model="seer", max_tokens=5, messages=[{"role": "user", "content": content}])
    [msg] = messages_of(engine)
    assert msg.content == "What is [img] and [img]?"
    assert msg.images == [DATA, URL]  # base64 as a data URL; a url source handed on for the engine to judge


def test_anthropic_image_only_message_and_count_tokens(server: Server, engine: FakeEngine) -> None:
    body = {"model": "seer", "messages": [{"role": "user", "content": [BASE64_BLOCK]}]}
    assert post(server, "/v1/messages/count_tokens", body).status_code == 200
    count = engine.last
    assert isinstance(count, CountTokensRequest)
    [msg] = count.request.messages or []
    assert (msg.role, msg.content, msg.images) == ("user", "[img]", [DATA])  # counted as /v1/messages sends it


def test_anthropic_tool_result_images_go_to_the_tool_message(server: Server, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "take a screenshot"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1",
                     "content": [{"type": "text", "text": "screen: "}, BASE64_BLOCK]},
                    {"type": "text", "text": "what do you see?"}]}]
    assert post(server, "/v1/messages", {"model": "seer", "max_tokens": 5, "messages": messages}).status_code == 200
    got = messages_of(engine)
    assert [(m.role, m.images) for m in got] == [("user", None), ("assistant", None), ("tool", [DATA]),
                                                 ("user", None)]
    assert got[2].content == "screen: [img]" and got[2].tool_name == "shot"


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]},
     "document blocks are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "system": [BASE64_BLOCK]}, "system: images"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages.0.content.0.source.type: expected base64 or url"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": B64}}]}]},
     "needs a media_type and data"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "source: expected an object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [BASE64_BLOCK]}]},
     "unsupported content block type 'image'"),  # as Anthropic's API: only users send images
])
def test_anthropic_unusable_blocks_are_400(server: Server, engine: FakeEngine, body: dict[str, Any],
                                           needle: str) -> None:
    r = post(server, "/v1/messages", {"model": "seer", "max_tokens": 5, **body})
    assert r.status_code == 400 and needle in error_text(r), r.text
    assert engine.requests == []


# ---- the text model: the engine decides -----------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"prompt": "x", "images": [B64], "stream": False}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": DATA}]}]}),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [BASE64_BLOCK]}]}),
])
def test_dialects_no_longer_refuse_images_themselves(server: Server, engine: FakeEngine, path: str,
                                                     body: dict[str, Any]) -> None:
    # the engine answers `"plain" does not support images`; the fake engine just records what it was sent
    assert post(server, path, {"model": "plain", **body}).status_code == 200
    req = generation(engine)
    images = req.images if path == "/api/generate" else (req.messages or [])[-1].images
    assert images == ([B64] if path == "/api/generate" else [DATA])


# ---- capabilities and the OpenAPI document -------------------------------------------------------------------------


def test_vision_capability_in_show_and_tags(server: Server) -> None:
    client = ollama.Client(host=server.url)
    assert list(client.show("seer").capabilities) == ["completion", "vision"]  # config.json has a vision_config
    assert list(client.show("tooly-seer").capabilities) == ["completion", "tools", "vision"]
    assert list(client.show("declared").capabilities) == ["completion", "vision"]  # models.yaml kind: vision
    assert list(client.show("text-only").capabilities) == ["completion"]  # models.yaml kind: generation
    assert list(client.show("plain").capabilities) == ["completion"]
    tags = {m["name"]: m for m in httpx.get(f"{server.url}/api/tags").json()["models"]}
    assert tags["seer"]["capabilities"] == ["completion", "vision"] and tags["plain"]["capabilities"] == ["completion"]


@pytest.mark.parametrize("path,body,ok", [
    ("/api/generate", {"images": [B64, URL]}, True),
    ("/api/generate", {"images": [1]}, False),
    ("/api/chat", {"messages": [{"role": "user", "images": [B64]}], "images": [B64]}, True),
    ("/api/chat", {"messages": [{"role": "user", "images": [{}]}]}, False),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": DATA}},
        {"type": "image_url", "image_url": URL}, {"type": "input_image", "image_url": DATA}]}]}, True),
    ("/v1/messages", {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [BASE64_BLOCK]}]},
     True),
])
def test_openapi_documents_images(path: str, body: dict[str, Any], ok: bool) -> None:
    if ok:
        jsonschema.validate(body, request_schema(path))
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, request_schema(path))
