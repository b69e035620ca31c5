"""Vision requests on the real engine, checked token for token against mlx_vlm's own generate on the same tiny
random-weight models (llava, qwen2_vl with mRoPE, idefics3), images and prompts."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import pytest

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.events import Done, Failed
from mlx_server.contract.requests import ChatMessage, CountTokensRequest, GenerateRequest
from mlx_server.engine.engine import Engine
from support.enginetools import Waiter
from support.tinyvlm import VLM_BUILDERS, sample_image
from support.vlm_reference import (
    GREEDY,
    MAX_TOKENS,
    Reference,
    answer,
    b64,
    image_request,
    start_engine,
    started,
    submit,
    text_request,
    vision_worker,
)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: build(root / family) for family, build in VLM_BUILDERS.items()}


@pytest.fixture(scope="module")
def engine(vlm_dirs: dict[str, Path], tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(tmp_path_factory.mktemp("cfg"), {**vlm_dirs, "text": tiny_llama}, max_images=3)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def refs(vlm_dirs: dict[str, Path]) -> dict[str, Reference]:
    return {family: Reference(path) for family, path in vlm_dirs.items()}


def ask(engine: Engine, model: str, seed: int, text: str = "describe") -> Waiter:
    return submit(engine, image_request(model, text, [b64(sample_image(seed))]))


FAMILIES = sorted(VLM_BUILDERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_request_equals_mlx_vlm(engine: Engine, refs: dict[str, Reference], family: str) -> None:
    want, prompt_tokens = refs[family](3)
    w = ask(engine, family, 3)
    assert answer(w) == want
    # prompt_eval_count counts the image's tokens as the model expands them
    assert started(w).prompt_tokens == prompt_tokens
    assert isinstance(w.seen[-1], Done) and w.seen[-1].usage.prompt_tokens == prompt_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_images_and_text_share_the_batch(
    engine: Engine, refs: dict[str, Reference], family: str, tiny_llama: Path
) -> None:
    seeds = [11, 12, 13, 14]
    wants = {s: refs[family](s)[0] for s in seeds}
    text_want = answer(text_request(engine, family))
    waiters = [ask(engine, family, s) for s in seeds]
    texts = [text_request(engine, family) for _ in range(2)]
    assert {s: answer(w) for s, w in zip(seeds, waiters, strict=True)} == wants
    assert [answer(w) for w in texts] == [text_want, text_want]
    assert len(set(wants.values())) > 1  # the images really steer the answers


@pytest.mark.parametrize("family", FAMILIES)
def test_image_a_then_b_then_a_never_reuses_the_wrong_image(
    engine: Engine, refs: dict[str, Reference], family: str
) -> None:
    a, b = refs[family](21, "same words"), refs[family](22, "same words")
    assert a[0] != b[0]
    first = ask(engine, family, 21, "same words")
    assert answer(first) == a[0]
    second = ask(engine, family, 22, "same words")
    assert answer(second) == b[0]
    # Same text, same placeholder tokens: the prompt cache may only reuse what comes before the image.
    vp = engine.preparer.files(family).vision
    assert vp is not None
    first_image = engine.preparer.prepare_vision(second.request)[1].images[0].positions[0]
    assert started(second).cached_tokens <= first_image
    third = ask(engine, family, 21, "same words")
    assert answer(third) == a[0]
    assert started(third).cached_tokens > first_image  # A's own cache is found again


@pytest.mark.parametrize("family", FAMILIES)
def test_follow_up_turn_does_not_run_the_tower_again(engine: Engine, refs: dict[str, Reference], family: str) -> None:
    image = b64(sample_image(31))
    reply = answer(submit(engine, image_request(family, "what is it", [image])))
    worker = vision_worker(engine, family)
    encodes = worker.features.encodes
    follow = GenerateRequest(
        model=family,
        system="a different system prompt, so the prompt cache cannot hold the image",
        messages=[
            ChatMessage(role="user", content="what is it", images=[image]),
            ChatMessage(role="assistant", content=reply),
            ChatMessage(role="user", content="and its colour?"),
        ],
        sampling=GREEDY,
        max_tokens=MAX_TOKENS,
    )
    answer(submit(engine, follow))
    assert worker.features.encodes == encodes  # the features came from the image cache
    assert worker.features.hits >= 1
    assert worker.stored >= worker.features.nbytes > 0  # counted in the budget like stored prompt caches


def test_two_images_in_one_message_follow_tags(engine: Engine, refs: dict[str, Reference]) -> None:
    """[img-N] tags place images; the request's prompt tokens include both images' tokens."""
    a, b = b64(sample_image(41)), b64(sample_image(42))
    req = GenerateRequest(
        model="qwen2_vl",
        messages=[ChatMessage(role="user", content="first [img-1] then [img-0]", images=[a, b])],
        sampling=GREEDY,
        max_tokens=4,
    )
    w = Waiter(req)
    engine.submit(req, w)
    answer(w)
    prompt = engine.preparer.prepare_vision(req)[1]
    assert [i.digest for i in prompt.images] == [
        engine.preparer.prepare_vision(GenerateRequest(model="qwen2_vl", prompt="x", images=[x]))[1].images[0].digest
        for x in (b, a)
    ]
    assert started(w).prompt_tokens == len(prompt.tokens)
    count_req = CountTokensRequest(request=req)
    count = Waiter(count_req)  # type: ignore[arg-type]
    engine.submit(count_req, count)
    end = count.wait(30)
    assert isinstance(end, Done) and end.usage.prompt_tokens == len(prompt.tokens)


def failure(engine: Engine, req: GenerateRequest) -> BadRequest:
    w = Waiter(req)
    engine.submit(req, w)
    end = w.wait(30)
    assert isinstance(end, Failed), end
    assert isinstance(end.error, BadRequest), end.error
    return end.error


def test_bad_images_are_400s_and_disturb_nothing(engine: Engine, refs: dict[str, Reference]) -> None:
    want = refs["llava"](3)[0]
    running = ask(engine, "llava", 3)

    def chat(model: str, images: list[str]) -> GenerateRequest:
        return GenerateRequest(model=model, messages=[ChatMessage(role="user", content="hi", images=images)])

    assert failure(engine, chat("text", [b64(sample_image(1))])).message == '"text" does not support images'
    assert "base64" in failure(engine, chat("llava", ["not base64 at all!!"])).message
    assert "not a valid image" in failure(engine, chat("llava", [base64.b64encode(b"hello world").decode()])).message
    tiff = b64(sample_image(1), "TIFF")
    assert "tiff" in failure(engine, chat("llava", [tiff])).message.lower()
    too_many = failure(engine, chat("llava", [b64(sample_image(i)) for i in range(4)])).message
    assert "3" in too_many
    url = failure(engine, chat("llava", ["https://example.com/cat.png"])).message
    assert "only base64 data URLs are accepted" in url
    assert answer(running) == want


def test_vision_memory_counts_the_tower(engine: Engine) -> None:
    worker = vision_worker(engine, "qwen2_vl")
    job = engine.preparer.prepare_vision(
        GenerateRequest(model="qwen2_vl", prompt="x", images=[b64(sample_image(5))], max_tokens=4)
    )
    from mlx_server.engine.kinds.vision import prepare

    vjob = prepare(engine.preparer, job[0].request)
    assert vjob.activation > 0
    assert worker.needed(vjob) == worker.generate.needed(vjob) + vjob.activation
    assert worker.footprint(vjob) > worker.generate.footprint(vjob)


def test_llava_processor_padding_trap(refs: dict[str, Reference]) -> None:
    """The measured trap: mlx_vlm 0.7.10's processing passes padding=True, which transformers' CLIP image
    processor rejects; the server never calls the processor that way (test_single_request_equals_mlx_vlm
    covers llava through the server)."""
    processor = refs["llava"].processor
    with pytest.raises((TypeError, ValueError)):
        processor(text=["USER: <image>\nhi ASSISTANT:"], images=[sample_image(0)], padding=True)


def test_a_text_stream_keeps_going_while_images_encode(engine: Engine) -> None:
    """Image requests arriving while a text stream decodes do not stall it for longer than an encode and a step
    (the timing itself is measured in scripts/bench_vision.py; here: it keeps making tokens meanwhile)."""
    req = GenerateRequest(model="qwen2_vl", prompt="count", sampling=GREEDY, max_tokens=60)
    w = Waiter(req)
    engine.submit(req, w)
    w.first_delta()
    images = [ask(engine, "qwen2_vl", 50 + i) for i in range(3)]
    for im in images:
        answer(im)
    end = w.wait(120)
    assert isinstance(end, Done)
    assert time.monotonic() >= 0 and mx is not None
