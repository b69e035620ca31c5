"""Gemma 3 vision requests on the real engine, checked token for token against mlx_vlm's own generate on a tiny
random-weight checkpoint (tests/support/tinyvlm_gemma3.py): the template's `<start_of_image>` expanded into
Gemma3Processor's `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`, SigLIP features pooled and
projected, and a text model whose sliding-window layers keep a RotatingKVCache shorter than the prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mlx_server.contract.events import Done
from mlx_server.contract.requests import ChatMessage, GenerateRequest
from mlx_server.engine.engine import Engine
from mlx_server.engine.prepare.families import FAMILIES
from mlx_server.engine.prepare.images import DecodedImage
from mlx_server.engine.prepare.vision import VisionProcessor, expand
from support.enginetools import Waiter
from support.tinyvlm import sample_image
from support.tinyvlm_gemma3 import MM_TOKENS_PER_IMAGE, SLIDING_WINDOW, build_gemma3
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

MODEL = "gemma3"
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)  # longer than the sliding window


class Gemma3Reference(Reference):
    """tests/support/vlm_reference.py's reference, for images anywhere in the message (text parts around them)."""

    def inputs(self, parts: list[Any]) -> tuple[str, dict[str, Any]]:
        """`parts`: text (str) and images (seed: int) in message order."""
        return self.parts_inputs(parts, sample_image)

    def parts(self, parts: list[Any]) -> tuple[str, int]:
        """The greedy answer to one user message of these parts, and the prompt's token count."""
        return self.generate((-1, repr(parts)), lambda: (*self.inputs(parts), {}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma3(tmp_path_factory.mktemp("vlms") / "gemma3")


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(tmp_path_factory.mktemp("cfg"), {MODEL: model_dir}, max_images=3)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Gemma3Reference:
    return Gemma3Reference(model_dir)


def request(seed: int, text: str = "describe", model: str = MODEL) -> GenerateRequest:
    return image_request(model, text, [b64(sample_image(seed))])


def ask(engine: Engine, seed: int, text: str = "describe") -> Waiter:
    return submit(engine, request(seed, text))


def test_family_is_registered_with_its_marker(ref: Gemma3Reference) -> None:
    family = FAMILIES["gemma3"]
    assert family.name == "gemma3" and family.positions is None
    assert family.marker(ref.processor) == "<start_of_image>"  # what the template writes, not the soft token


def test_prompt_tokens_and_arrays_equal_the_processor(engine: Engine, ref: Gemma3Reference) -> None:
    """The server's expansion (in numpy, off the processor) is the processor's own: tokens and pixels."""
    _, prompt = engine.preparer.prepare_vision(request(7))
    _, want = ref.inputs([7, "describe"])
    assert prompt.tokens == np.array(want["input_ids"])[0].tolist()
    [image] = prompt.images
    np.testing.assert_array_equal(image.arrays["pixel_values"], np.array(want["pixel_values"]))
    assert all(type(v) is np.ndarray for v in image.arrays.values())  # no MLX arrays off the inference thread
    image_id = ref.model.config.image_token_index
    assert [i for i, t in enumerate(prompt.tokens) if t == image_id] == list(image.positions)
    assert image.tokens == MM_TOKENS_PER_IMAGE
    assert image.arrays["mask"].shape == (1, len(image.ids))  # get_input_embeddings needs one


def test_pan_and_scan_crops_expand_like_the_processor(model_dir: Path) -> None:
    """Off in the released configs; when a config turns it on, each crop gets its own `<start_of_image>` block
    in the processor's sentence, and its pixels follow the original's."""
    vp = VisionProcessor.load(model_dir, json.loads((model_dir / "config.json").read_text()))
    ip = vp.processor.image_processor
    ip.do_pan_and_scan, ip.pan_and_scan_min_crop_size = True, 8
    ip.pan_and_scan_max_num_crops, ip.pan_and_scan_min_ratio_to_activate = 4, 1.2
    image = sample_image(9, (96, 32))
    text = "<bos><start_of_turn>user\n<start_of_image>describe<end_of_turn>\n<start_of_turn>model\n"
    decoded = DecodedImage(image=image, digest="0" * 64, format="PNG", width=96, height=32)
    tokens, [placed] = expand(text, [0], [decoded], vp)
    want = vp.processor(text=[text], images=[image])
    assert tokens == np.array(want["input_ids"])[0].tolist()
    np.testing.assert_array_equal(placed.arrays["pixel_values"], np.array(want["pixel_values"]))
    assert placed.arrays["pixel_values"].shape[0] == 1 + 3  # the original and 3 crops
    assert placed.tokens == 4 * MM_TOKENS_PER_IMAGE


def test_single_request_equals_mlx_vlm(engine: Engine, ref: Gemma3Reference) -> None:
    want, prompt_tokens = ref.parts([3, "describe"])
    assert prompt_tokens > SLIDING_WINDOW  # the sliding layers' cache wraps during prefill
    w = ask(engine, 3)
    assert answer(w) == want
    # prompt_eval_count counts the image's tokens as the processor expands them
    assert started(w).prompt_tokens == prompt_tokens
    assert isinstance(w.seen[-1], Done) and w.seen[-1].usage.prompt_tokens == prompt_tokens


def test_concurrent_images_and_text_share_the_batch(engine: Engine, ref: Gemma3Reference) -> None:
    seeds = [11, 12, 13, 14]
    wants = {s: ref.parts([s, "describe"])[0] for s in seeds}

    text_want = answer(text_request(engine, MODEL))
    waiters = [ask(engine, s) for s in seeds]
    text = text_request(engine, MODEL)
    assert {s: answer(w) for s, w in zip(seeds, waiters, strict=True)} == wants
    assert answer(text) == text_want
    assert len(set(wants.values())) > 1  # the images really steer the answers


def test_image_a_then_b_then_a_never_reuses_the_wrong_image(engine: Engine, ref: Gemma3Reference) -> None:
    a, b = ref.parts([21, "same words"]), ref.parts([22, "same words"])
    assert a[0] != b[0]
    first = ask(engine, 21, "same words")
    assert answer(first) == a[0]
    second = ask(engine, 22, "same words")
    assert answer(second) == b[0]
    first_image = engine.preparer.prepare_vision(second.request)[1].images[0].positions[0]
    assert started(second).cached_tokens <= first_image
    third = ask(engine, 21, "same words")
    assert answer(third) == a[0]
    # (A's stored cache is not reused here, nor any prefix of it: its sliding layers' RotatingKVCache has wrapped
    # past the prompt, and mlx_lm only trims a rotating cache that has not.)


def test_image_after_text_longer_than_the_window(engine: Engine, ref: Gemma3Reference) -> None:
    """Text before the image fills the sliding window first: the image's rows land in a cache that has wrapped."""
    want, prompt_tokens = ref.parts([LONG, 5, "describe"])
    w = submit(engine, request(5, f"{LONG} [img] describe"))
    assert (answer(w), started(w).prompt_tokens) == (want, prompt_tokens)
    assert engine.preparer.prepare_vision(w.request)[1].images[0].positions[0] > SLIDING_WINDOW


def test_follow_up_turn_does_not_run_the_tower_again(engine: Engine) -> None:
    image = b64(sample_image(31))
    turn = ChatMessage(role="user", content="what is it", images=[image])
    first = GenerateRequest(model=MODEL, messages=[turn], sampling=GREEDY, max_tokens=MAX_TOKENS)
    reply = answer(submit(engine, first))
    worker = vision_worker(engine, MODEL)
    encodes = worker.features.encodes
    follow = GenerateRequest(
        model=MODEL,
        system="a different system prompt, so the prompt cache cannot hold the image",
        messages=[turn, ChatMessage(role="assistant", content=reply), ChatMessage(role="user", content="colour?")],
        sampling=GREEDY,
        max_tokens=MAX_TOKENS,
    )
    answer(submit(engine, follow))
    assert worker.features.encodes == encodes  # the features came from the image cache
    assert worker.features.hits >= 1
    assert worker.stored >= worker.features.nbytes > 0


def test_chunked_prefill_through_the_sliding_window(
    model_dir: Path, ref: Gemma3Reference, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Chunks shorter than the window, an image split across two of them, the cache wrapping between chunks:
    still mlx_vlm's answers (it prefills the prompt in one pass)."""
    e = start_engine(tmp_path_factory.mktemp("cfg"), {MODEL: model_dir}, max_images=3, prefill_chunk=5)
    try:
        cases = [[3, "describe"], [LONG, 5, "describe"]]
        waiters = [
            submit(e, request(3)),
            submit(e, request(5, f"{LONG} [img] describe")),
        ]
        for case, w in zip(cases, waiters, strict=True):
            assert (answer(w), started(w).prompt_tokens) == ref.parts(case)
    finally:
        e.stop()
