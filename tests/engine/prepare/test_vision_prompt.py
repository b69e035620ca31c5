"""A vision prompt as the preparation stage makes it (numpy only): tags and template placement, token expansion
and pixel arrays equal to each family's own mlx-vlm processor, Qwen-VL's mRoPE positions equal to mlx-vlm's
`get_rope_index`, and refusals."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import ChatMessage, GenerateRequest
from mlx_server.engine.prepare.images import ImageLimits, decode_images
from mlx_server.engine.prepare.vision import (
    VisionProcessor,
    VisionPrompt,
    cut,
    raw_text,
    request_images,
    template_messages,
    vision_prompt,
    with_positions,
)
from support.tinyvlm import VLM_BUILDERS, sample_image


def b64(seed: int, size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    sample_image(seed, size).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module", params=sorted(VLM_BUILDERS))
def vp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> VisionProcessor:
    path = VLM_BUILDERS[request.param](tmp_path_factory.mktemp("vlm") / request.param)
    return VisionProcessor.load(path, json.loads((path / "config.json").read_text()))


def chat(content: str, images: list[str], **kw: Any) -> GenerateRequest:
    return GenerateRequest(model="m", messages=[ChatMessage(role="user", content=content, images=images)], **kw)


def render(vp: VisionProcessor) -> Any:
    return lambda messages: vp.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_of(vp: VisionProcessor, req: GenerateRequest) -> VisionPrompt:
    decoded = decode_images(request_images(req), ImageLimits())
    return with_positions(vision_prompt(req, vp, decoded, render(vp)), vp)


def test_tags_place_images_and_untagged_ones_lead() -> None:
    req = GenerateRequest(
        model="m",
        messages=[
            ChatMessage(role="user", content="one [img] two", images=["a", "b"]),
            ChatMessage(role="assistant", content="ok"),
            ChatMessage(role="user", content="see [img-0] again", images=["c"]),
        ],
    )
    messages, order = template_messages(req, 3)
    # Image 0 is placed by message 2's [img-0], so message 0's [img] takes its next image, 1.
    assert messages[0]["content"] == [
        {"type": "text", "text": "one "},
        {"type": "image"},
        {"type": "text", "text": " two"},
    ]
    assert messages[1] == {"role": "assistant", "content": "ok"}
    assert messages[2]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "see "},
        {"type": "image"},
        {"type": "text", "text": " again"},
    ]
    # message 2: its own image 2 is untagged and leads, then image 0 where [img-0] stands
    assert order == [1, 2, 0]
    messages, order = template_messages(chat("one [img] two", ["a", "b"]), 2)
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text", "image", "text"]
    assert order == [1, 0]  # [img] takes the message's first image; the other leads
    with pytest.raises(BadRequest, match=r"\[img-5\]"):
        template_messages(chat("x [img-5]", ["a"]), 1)
    with pytest.raises(BadRequest, match="no image left"):
        template_messages(chat("[img] [img]", ["a"]), 1)


def test_raw_prompt_places_images_by_tags() -> None:
    text, order = raw_text(GenerateRequest(model="m", prompt="A [img-1] B", raw=True), "<I>", 2)
    assert (text, order) == ("<I>A <I> B", [0, 1])


def test_tokens_and_pixels_equal_the_family_processor(vp: VisionProcessor) -> None:
    req = chat("what [img] is this", [b64(0), b64(1, (40, 70))])
    prompt = prompt_of(vp, req)
    messages, order = template_messages(req, 2)
    text = render(vp)(messages)
    decoded = decode_images(request_images(req), ImageLimits())
    images = [decoded[i].image for i in order]
    ref = vp.processor(text=[text], images=[images] if vp.family.name == "idefics3" else images)
    assert prompt.tokens == np.array(ref["input_ids"])[0].tolist()
    axis = 1 if vp.family.name == "idefics3" else 0
    ours = np.concatenate([i.arrays["pixel_values"] for i in prompt.images], axis=axis)
    np.testing.assert_allclose(ours, np.array(ref["pixel_values"]), atol=1e-5)
    image_id = vp.image_token_id
    assert sum(i.tokens for i in prompt.images) == prompt.tokens.count(image_id)
    assert all(prompt.tokens[p] == image_id for i in prompt.images for p in i.positions)
    assert prompt.images[0].digest != prompt.images[1].digest


def test_qwen_mrope_positions_equal_mlx_vlm(tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    path = VLM_BUILDERS["qwen2_vl"](tmp_path / "q")
    vp = VisionProcessor.load(path, json.loads((path / "config.json").read_text()))
    prompt = prompt_of(vp, chat("[img] and [img] then text", [b64(2), b64(3, (90, 30))]))
    assert prompt.mrope is not None
    grids = mx.array(np.concatenate([i.arrays["image_grid_thw"] for i in prompt.images]))
    positions, delta = load_model(path).language_model.get_rope_index(mx.array([prompt.tokens]), grids, None, None)
    np.testing.assert_array_equal(np.array(positions)[:, 0], prompt.mrope)
    assert int(np.array(delta).item()) == prompt.rope_delta != 0


def test_cutting_into_an_image_is_refused(vp: VisionProcessor) -> None:
    prompt = prompt_of(vp, chat("x", [b64(0)]))
    first = prompt.images[0].positions[0]
    if first > 0:
        kept = cut(prompt, first)
        assert kept.images[0].positions[0] == 0 and kept.tokens == prompt.tokens[first:]
    with pytest.raises(BadRequest, match="longer than the context"):
        cut(prompt, first + 1)


def test_template_that_drops_images_is_a_400(vp: VisionProcessor) -> None:
    req = chat("hi", [b64(0)])
    decoded = decode_images(request_images(req), ImageLimits())
    with pytest.raises(BadRequest, match="placed 0 image"):
        vision_prompt(req, vp, decoded, lambda messages: "no markers here")
