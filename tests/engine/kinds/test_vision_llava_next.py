"""LLaVA-NeXT (LLaVA 1.6, Ollama's `llava:7b`) vision requests on the real engine, checked token for token against
mlx_vlm's own generate on a tiny random-weight checkpoint (tests/support/tinyvlm_llava_next.py): anyres tiles
picked from `image_grid_pinpoints`, a token count that follows the image's size and aspect (base tile + unpadded
tile grid + a newline per row), and the features packed the same way.

The reference is mlx_vlm's stream_generate on LlavaNextProcessor's inputs, with one correction: mlx-vlm's LLaVA-NeXT
`get_input_embeddings` does not pack anyres features (see test_mlx_vlm_llava_next_merge_trap), so the reference
hands it the features packed as HF's `pack_image_features` does (written here in numpy, from HF's code) through
its own `cached_image_features` input; everything else — tower, projector, merge, prefill, decode — is mlx-vlm's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_server.contract.events import Done
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.engine import Engine
from mlx_server.engine.prepare.families import FAMILIES
from mlx_server.engine.prepare.families.llava_next import image_features
from support.enginetools import Waiter
from support.tinyvlm import sample_image
from support.tinyvlm_llava_next import PINPOINTS, build_llava_next
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

MODEL = "llava_next"
WIDE = (64, 48)  # pinpoint 32x64: 2 tiles, unpadded 4x6 → 16 + 24 + 4 = 44 <image>
SMALL = (16, 16)  # pinpoint 32x32: 1 tile, 4x4 → 16 + 16 + 4 = 36 <image>
TALL = (24, 40)  # pinpoint 64x32: 2 tiles, unpadded 6x4 → 16 + 24 + 6 = 46 <image>
COUNTS = {WIDE: 44, SMALL: 36, TALL: 46}


def hf_unpad_image(tensor: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """transformers' modeling_llava_next.unpad_image, in numpy ((C, H, W) features)."""
    original_height, original_width = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(round(original_height * scale_factor, 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(round(original_width * scale_factor, 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def hf_packed_features(model: Any, pixel_values: Any, image_sizes: Any) -> np.ndarray:
    """One image's features as transformers' LlavaNextForConditionalGeneration packs them ("spatial_unpad",
    pack_image_features), from mlx-vlm's tower and projector: (tokens, D)."""
    from transformers.image_processing_utils import select_best_resolution

    *_, hidden = model.vision_tower(mx.array(pixel_values)[0].transpose(0, 2, 3, 1), output_hidden_states=True)
    feats = np.array(model.multi_modal_projector(hidden[model.vision_feature_layer][:, 1:]))
    vision = model.config.vision_config
    base, rest = feats[0], feats[1:]
    height = width = vision.image_size // vision.patch_size
    size = [int(x) for x in np.array(image_sizes).reshape(-1)[:2]]
    best_h, best_w = select_best_resolution(size, PINPOINTS)
    num_patch_height, num_patch_width = best_h // vision.image_size, best_w // vision.image_size
    rest = rest[: num_patch_height * num_patch_width].reshape(num_patch_height, num_patch_width, height, width, -1)
    rest = rest.transpose(4, 0, 2, 1, 3).reshape(rest.shape[-1], num_patch_height * height, num_patch_width * width)
    rest = hf_unpad_image(rest, (size[0], size[1]))
    newline = np.broadcast_to(np.array(model.image_newline)[:, None, None], (*rest.shape[:-1], 1))
    rest = np.concatenate([rest, newline], axis=-1)
    rest = rest.reshape(rest.shape[0], -1).T
    return np.concatenate([base, rest], axis=0)


class LlavaNextReference(Reference):
    """tests/support/vlm_reference.py's reference for images of any size, with HF-packed anyres features."""

    def inputs(self, image: Image.Image, text: str) -> tuple[str, dict[str, Any]]:
        return self.chat_inputs([{"type": "image"}, {"type": "text", "text": text}], [image])

    def sized(self, seed: int, text: str = "describe", size: tuple[int, int] = WIDE) -> tuple[str, int]:
        """The greedy answer for one (seed, size) image before `text`, and the prompt's token count."""

        def build() -> Inputs:
            prompt, inputs = self.inputs(sample_image(seed, size), text)
            packed = hf_packed_features(self.model, inputs["pixel_values"], inputs["image_sizes"])
            # one feature per <image> token: mlx-vlm's merge puts chunk k at the k-th image token
            extra = {"image_sizes": inputs["image_sizes"], "cached_image_features": mx.array(packed)[:, None, :]}
            return prompt, inputs, extra

        return self.generate((seed, f"{text}\0{size}"), build)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava_next(tmp_path_factory.mktemp("vlms") / MODEL)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(tmp_path_factory.mktemp("cfg"), {MODEL: model_dir}, max_images=3)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> LlavaNextReference:
    return LlavaNextReference(model_dir)


def request(seed: int, text: str = "describe", size: tuple[int, int] = WIDE) -> GenerateRequest:
    return image_request(MODEL, text, [b64(sample_image(seed, size))])


def ask(engine: Engine, seed: int, text: str = "describe", size: tuple[int, int] = WIDE) -> Waiter:
    return submit(engine, request(seed, text, size))


def test_family_is_registered() -> None:
    assert FAMILIES[MODEL].name == MODEL


@pytest.mark.parametrize("size", [WIDE, SMALL, TALL, (100, 20), (33, 31)], ids=str)
def test_prompt_tokens_and_arrays_equal_the_processor(
    engine: Engine, ref: LlavaNextReference, size: tuple[int, int]
) -> None:
    """The server's expansion (numpy, off the processor) is LlavaNextProcessor's own: tokens, pixels, sizes."""
    _, prompt = engine.preparer.prepare_vision(request(7, size=size))
    _, want = ref.inputs(sample_image(7, size), "describe")
    assert prompt.tokens == np.array(want["input_ids"])[0].tolist()
    [image] = prompt.images
    np.testing.assert_array_equal(image.arrays["pixel_values"], np.array(want["pixel_values"]))
    np.testing.assert_array_equal(image.arrays["image_sizes"], np.array(want["image_sizes"]))
    assert all(type(v) is np.ndarray for v in image.arrays.values())  # no MLX arrays off the inference thread
    image_id = ref.model.config.image_token_index
    assert [i for i, t in enumerate(prompt.tokens) if t == image_id] == list(image.positions)
    if size in COUNTS:
        assert image.tokens == COUNTS[size]


@pytest.mark.parametrize("size", [WIDE, SMALL, TALL, (100, 20), (20, 100)], ids=str)
def test_packed_features_follow_hf(engine: Engine, ref: LlavaNextReference, size: tuple[int, int]) -> None:
    """The family's encoder packs the tower's features as HF does: one row per <image> token, base tile first,
    the image newline closing every row of the unpadded grid."""
    _, prompt = engine.preparer.prepare_vision(request(8, size=size))
    [image] = prompt.images
    arrays = {k: mx.array(v) for k, v in image.arrays.items()}
    ours = np.array(image_features(ref.model, arrays["pixel_values"], arrays))
    want = hf_packed_features(ref.model, image.arrays["pixel_values"], image.arrays["image_sizes"])
    assert ours.shape == want.shape == (image.tokens, ref.model.config.text_config.hidden_size)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    rows = int(image.arrays["image_layout"][0][3])
    cols = int(image.arrays["image_layout"][0][5])
    newline = np.array(ref.model.image_newline)
    ends = ours[16:].reshape(rows, cols + 1, -1)[:, -1]
    np.testing.assert_allclose(ends, np.broadcast_to(newline, ends.shape), rtol=1e-6)


def test_mlx_vlm_llava_next_merge_trap(ref: LlavaNextReference) -> None:
    """The measured trap: mlx-vlm 0.7.10's LLaVA-NeXT get_input_embeddings ignores image_sizes and puts a whole
    tile's features (then blocks of image_newline) at each of the first 2 × (1 + tiles) <image> tokens, so its
    sequence is longer than the processor's prompt: it is neither the reference's features nor the server's."""
    _, inputs = ref.inputs(sample_image(3, WIDE), "describe")
    out = ref.model.get_input_embeddings(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    tiles = inputs["pixel_values"].shape[1]
    assert inputs["input_ids"].shape[1] == 24 + COUNTS[WIDE]
    assert out.inputs_embeds.shape[1] == 24 + 2 * tiles * 16 != inputs["input_ids"].shape[1]


def test_single_request_equals_mlx_vlm(engine: Engine, ref: LlavaNextReference) -> None:
    want, prompt_tokens = ref.sized(3)
    w = ask(engine, 3)
    got = answer(w)
    # prompt_eval_count counts the image's tokens as LlavaNextProcessor expands them
    assert started(w).prompt_tokens == prompt_tokens
    assert got == want
    assert isinstance(w.seen[-1], Done) and w.seen[-1].usage.prompt_tokens == prompt_tokens


def test_two_image_sizes_make_different_token_counts(engine: Engine, ref: LlavaNextReference) -> None:
    wide, small = ref.sized(4, size=WIDE), ref.sized(4, size=SMALL)
    assert wide[1] - small[1] == COUNTS[WIDE] - COUNTS[SMALL]
    a, b = ask(engine, 4, size=WIDE), ask(engine, 4, size=SMALL)
    assert (answer(a), started(a).prompt_tokens) == wide
    assert (answer(b), started(b).prompt_tokens) == small


def test_concurrent_images_and_text_share_the_batch(engine: Engine, ref: LlavaNextReference) -> None:
    seeds = [11, 12, 13, 14]
    sizes = [WIDE, SMALL, WIDE, TALL]
    wants = {s: ref.sized(s, size=z)[0] for s, z in zip(seeds, sizes, strict=True)}

    text_want = answer(text_request(engine, MODEL))
    waiters = [ask(engine, s, size=z) for s, z in zip(seeds, sizes, strict=True)]
    text = text_request(engine, MODEL)
    assert {s: answer(w) for s, w in zip(seeds, waiters, strict=True)} == wants
    assert answer(text) == text_want
    assert len(set(wants.values())) > 1  # the images really steer the answers


def test_image_a_then_b_then_a_never_reuses_the_wrong_image(engine: Engine, ref: LlavaNextReference) -> None:
    a, b = ref.sized(21, "same words"), ref.sized(22, "same words")
    assert a[0] != b[0]
    first = ask(engine, 21, "same words")
    assert answer(first) == a[0]
    second = ask(engine, 22, "same words")
    assert answer(second) == b[0]
    first_image = engine.preparer.prepare_vision(second.request)[1].images[0].positions[0]
    assert started(second).cached_tokens <= first_image
    third = ask(engine, 21, "same words")
    assert answer(third) == a[0]
    assert started(third).cached_tokens > first_image  # A's own cache is found again
