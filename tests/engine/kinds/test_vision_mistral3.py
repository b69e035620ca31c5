"""Mistral 3 (Mistral Small 3.1) and Pixtral vision requests on the real engine, checked token for token against
mlx_vlm's own generate on tiny random-weight checkpoints: Pixtral tower with 2D rope (Mistral 3: and a 2x2 patch
merger), and an image token grid (`[IMG]` per cell, `[IMG_BREAK]` per row, `[IMG_END]`) that follows the image's
size."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from mlx_server.contract.events import Done
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.engine import Engine
from mlx_server.engine.prepare.families import FAMILIES
from support.enginetools import Waiter
from support.tinyvlm import sample_image
from support.tinyvlm_mistral3 import build_mistral3, build_pixtral
from support.vlm_reference import (
    Inputs,
    Reference,
    answer,
    b64,
    image_request,
    start_engine,
    started,
    submit,
    text_request,
)

BUILDERS = {"mistral3": build_mistral3, "pixtral": build_pixtral}
MODELS = sorted(BUILDERS)
WIDE = (64, 48)  # resized to 32x24: 3 rows of 4 [IMG]
SMALL = (16, 16)  # kept: 2 rows of 2 [IMG]


class SizedReference(Reference):
    """tests/support/vlm_reference.py's reference, for images of any size and several images in one message."""

    def inputs(self, images: list[Image.Image], text: str) -> tuple[str, dict[str, Any]]:
        return self.chat_inputs([*({"type": "image"} for _ in images), {"type": "text", "text": text}], images)

    def sized(self, seed: int, text: str = "describe", size: tuple[int, int] = WIDE) -> tuple[str, int]:
        return self.images([(seed, size)], text)

    def images(self, images: list[tuple[int, tuple[int, int]]], text: str = "describe") -> tuple[str, int]:
        """The greedy answer for these (seed, size) images before `text`, and the prompt's token count."""

        def build() -> Inputs:
            prompt, inputs = self.inputs([sample_image(seed, size) for seed, size in images], text)
            return prompt, inputs, {"image_sizes": inputs["image_sizes"]}

        return self.generate((-1, f"{text}\0{images}"), build)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def engine(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(tmp_path_factory.mktemp("cfg"), model_dirs, max_images=3)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def refs(model_dirs: dict[str, Path]) -> dict[str, SizedReference]:
    return {name: SizedReference(path) for name, path in model_dirs.items()}


def request(model: str, seed: int, text: str = "describe", size: tuple[int, int] = WIDE) -> GenerateRequest:
    return image_request(model, text, [b64(sample_image(seed, size))])


def ask(engine: Engine, model: str, seed: int, text: str = "describe", size: tuple[int, int] = WIDE) -> Waiter:
    return submit(engine, request(model, seed, text, size))


def test_family_is_registered_for_mistral3_and_pixtral() -> None:
    assert FAMILIES["mistral3"] is FAMILIES["pixtral"]
    assert FAMILIES["mistral3"].name == "mistral3"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", [WIDE, SMALL, (24, 40)], ids=["wide", "small", "tall"])
def test_prompt_tokens_and_arrays_equal_the_processor(
    engine: Engine, refs: dict[str, SizedReference], model: str, size: Any
) -> None:
    """The server's expansion (in numpy, off the processor) is the processor's own: tokens, pixels, sizes."""
    ref = refs[model]
    _, prompt = engine.preparer.prepare_vision(request(model, 7, size=size))
    _, want = ref.inputs([sample_image(7, size)], "describe")
    assert prompt.tokens == np.array(want["input_ids"])[0].tolist()
    [image] = prompt.images
    np.testing.assert_array_equal(image.arrays["pixel_values"], np.array(want["pixel_values"]))
    np.testing.assert_array_equal(image.arrays["image_sizes"], np.array(want["image_sizes"]))
    assert all(type(v) is np.ndarray for v in image.arrays.values())  # no MLX arrays off the inference thread
    image_id = ref.model.config.image_token_index
    assert [i for i, t in enumerate(prompt.tokens) if t == image_id] == list(image.positions)
    h, w = (int(x) for x in want["image_sizes"][0].tolist())
    assert image.tokens == (h // 8) * (w // 8)


@pytest.mark.parametrize("model", MODELS)
def test_single_request_equals_mlx_vlm(engine: Engine, refs: dict[str, SizedReference], model: str) -> None:
    want, prompt_tokens = refs[model].sized(3)
    w = ask(engine, model, 3)
    assert answer(w) == want
    assert started(w).prompt_tokens == prompt_tokens  # the image's [IMG] grid counted as the processor makes it
    assert isinstance(w.seen[-1], Done) and w.seen[-1].usage.prompt_tokens == prompt_tokens


@pytest.mark.parametrize("model", MODELS)
def test_two_image_sizes_make_different_token_counts(
    engine: Engine, refs: dict[str, SizedReference], model: str
) -> None:
    wide, small = refs[model].sized(4, size=WIDE), refs[model].sized(4, size=SMALL)
    assert wide[1] - small[1] == (12 + 2) - (4 + 1)  # [IMG] and [IMG_BREAK] differ, one [IMG_END] each
    a, b = ask(engine, model, 4, size=WIDE), ask(engine, model, 4, size=SMALL)
    assert (answer(a), started(a).prompt_tokens) == wide
    assert (answer(b), started(b).prompt_tokens) == small


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_images_and_text_share_the_batch(
    engine: Engine, refs: dict[str, SizedReference], model: str
) -> None:
    seeds = [11, 12, 13, 14]
    sizes = [WIDE, SMALL, WIDE, (24, 40)]
    wants = {s: refs[model].sized(s, size=z)[0] for s, z in zip(seeds, sizes, strict=True)}

    text_want = answer(text_request(engine, model))
    waiters = [ask(engine, model, s, size=z) for s, z in zip(seeds, sizes, strict=True)]
    text = text_request(engine, model)
    assert {s: answer(w) for s, w in zip(seeds, waiters, strict=True)} == wants
    assert answer(text) == text_want
    assert len(set(wants.values())) > 1  # the images really steer the answers


@pytest.mark.parametrize("model", MODELS)
def test_image_a_then_b_then_a_never_reuses_the_wrong_image(
    engine: Engine, refs: dict[str, SizedReference], model: str
) -> None:
    a, b = refs[model].sized(21, "same words"), refs[model].sized(22, "same words")
    assert a[0] != b[0]
    first = ask(engine, model, 21, "same words")
    assert answer(first) == a[0]
    second = ask(engine, model, 22, "same words")
    assert answer(second) == b[0]
    first_image = engine.preparer.prepare_vision(second.request)[1].images[0].positions[0]
    assert started(second).cached_tokens <= first_image
    third = ask(engine, model, 21, "same words")
    assert answer(third) == a[0]
    assert started(third).cached_tokens > first_image  # A's own cache is found again


@pytest.mark.parametrize("model", MODELS)
def test_two_images_of_different_sizes_in_one_message(
    engine: Engine, refs: dict[str, SizedReference], model: str
) -> None:
    """The processor pads both into one pixel batch; the server encodes each on its own: same tokens, same answer."""
    want = refs[model].images([(51, WIDE), (52, SMALL)])
    images = [b64(sample_image(51, WIDE)), b64(sample_image(52, SMALL))]
    req = image_request(model, "describe", images)
    w = submit(engine, req)
    assert (answer(w), started(w).prompt_tokens) == want
    prompt = engine.preparer.prepare_vision(req)[1]
    assert [image.tokens for image in prompt.images] == [12, 4]
