"""Qwen3-VL vision requests on the real engine, checked token for token against mlx_vlm's own generate on a tiny
random-weight checkpoint (tests/support/tinyvlm_qwen3_vl.py): Qwen2-VL's image expansion and mRoPE positions
(checked against Qwen3-VL's own processor and `get_rope_index`), interleaved mRoPE inside the model, and the
deepstack features the engine adds at the image rows of the first decoder layers (shown to change the answers,
so the token-for-token checks would catch them missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Union

import mlx.core as mx
import numpy as np
import pytest

from mlx_server.contract.events import Done
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.engine import Engine
from mlx_server.engine.prepare.families import FAMILIES, qwen_vl
from support.enginetools import Waiter
from support.tinyvlm import sample_image
from support.tinyvlm_qwen3_vl import DEEPSTACK_INDEXES, SAMPLE_IMAGE_TOKENS, build_qwen3_vl
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
    vision_worker,
)

MODEL = "qwen3_vl"
WIDE = (64, 48)  # kept: 6x8 patches, 12 tokens
TALL = (32, 64)  # kept: 8x4 patches, 8 tokens

Size = tuple[int, int]
Part = Union[str, tuple[int, Size]]  # text, or an image as (seed, size)


class Qwen3Reference(Reference):
    """tests/support/vlm_reference.py's reference, for one user message of text and images in any order, and
    optionally with the deepstack features left out (what an engine that dropped them would answer)."""

    def inputs(self, parts: list[Part]) -> tuple[str, dict[str, Any]]:
        return self.parts_inputs(parts, lambda image: sample_image(*image))

    def parts(self, parts: list[Part], *, deepstack: bool = True) -> tuple[str, int]:
        """The greedy answer to one user message of these parts, and the prompt's token count."""

        def build() -> Inputs:
            prompt, inputs = self.inputs(parts)
            return prompt, inputs, {"image_grid_thw": inputs["image_grid_thw"]}

        inner = self.model.language_model.model
        if not deepstack:
            inner._deepstack_process = lambda hidden, _mask, _embeds: hidden
        try:
            return self.generate((-1 if deepstack else -2, repr(parts)), build)
        finally:
            inner.__dict__.pop("_deepstack_process", None)

    def one(self, seed: int, text: str = "describe", **kw: Any) -> tuple[str, int]:
        """An image before its text: what a chat message with one image renders as."""
        return self.parts([(seed, WIDE), text], **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen3_vl(tmp_path_factory.mktemp("vlms") / MODEL)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(tmp_path_factory.mktemp("cfg"), {MODEL: model_dir}, max_images=3)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Qwen3Reference:
    return Qwen3Reference(model_dir)


def message_request(parts: list[Part]) -> GenerateRequest:
    """The server request for these parts: each image placed by an [img] tag where it stands."""
    text = "".join(p if isinstance(p, str) else "[img]" for p in parts)
    images = [b64(sample_image(seed, size)) for seed, size in (p for p in parts if not isinstance(p, str))]
    return image_request(MODEL, text, images)


def request(seed: int, text: str = "describe") -> GenerateRequest:
    """One image, untagged: it goes before the message's text."""
    return image_request(MODEL, text, [b64(sample_image(seed, WIDE))])


def ask(engine: Engine, seed: int, text: str = "describe") -> Waiter:
    return submit(engine, request(seed, text))


CASES: dict[str, list[Part]] = {
    "one": [(7, WIDE), "describe"],
    "text-first": ["look at ", (8, TALL), " and tell"],
    "two-sizes": ["first ", (9, WIDE), " then ", (10, TALL), " compare"],
}


def test_family_is_registered_with_qwen2_vl_positions(ref: Qwen3Reference) -> None:
    family = FAMILIES["qwen3_vl"]
    assert family.name == "qwen3_vl"
    assert family.process is qwen_vl.process and family.positions is qwen_vl.positions
    assert family.marker(ref.processor) == "<|image_pad|>"
    assert len(ref.model.vision_tower.deepstack_merger_list) == len(DEEPSTACK_INDEXES) == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_arrays_and_positions_equal_the_processor_and_get_rope_index(
    engine: Engine, ref: Qwen3Reference, case: str
) -> None:
    """Tokens, pixels and grids as Qwen3VLProcessor makes them; positions and delta as the model's own
    get_rope_index computes them from those."""
    parts = CASES[case]
    _, prompt = engine.preparer.prepare_vision(message_request(parts))
    _, want = ref.inputs(parts)
    ids = np.array(want["input_ids"])
    assert prompt.tokens == ids[0].tolist()
    assert all(type(v) is np.ndarray for image in prompt.images for v in image.arrays.values())
    pixels = np.concatenate([image.arrays["pixel_values"] for image in prompt.images])
    np.testing.assert_array_equal(pixels, np.array(want["pixel_values"]))
    grids = np.concatenate([image.arrays["image_grid_thw"] for image in prompt.images])
    np.testing.assert_array_equal(grids, np.array(want["image_grid_thw"]))
    image_id = ref.model.config.image_token_id
    assert [p for image in prompt.images for p in image.positions] == np.flatnonzero(ids[0] == image_id).tolist()
    positions, deltas = ref.model.language_model.get_rope_index(
        mx.array(ids), want["image_grid_thw"], None, want["attention_mask"]
    )
    assert prompt.mrope is not None and prompt.mrope.dtype == np.int32
    np.testing.assert_array_equal(prompt.mrope, np.array(positions)[:, 0, :])
    assert prompt.rope_delta == int(np.array(deltas)[0, 0]) < 0  # the image grids run behind the token count
    if case == "one":
        assert prompt.images[0].tokens == SAMPLE_IMAGE_TOKENS


def test_the_deepstack_features_steer_the_answers(engine: Engine, ref: Qwen3Reference) -> None:
    """Without its deepstack features (what an engine dropping them answers) the model answers otherwise, so the
    token-for-token tests below catch their omission; the engine keeps them with each image's features."""

    def changed(parts: list[Part]) -> bool:
        return ref.parts(parts)[0] != ref.parts(parts, deepstack=False)[0]

    # each test below compares at least one answer that differs without them
    assert changed([(3, WIDE), "describe"])  # single
    assert any(changed([(s, WIDE), "describe"]) for s in (11, 12, 13, 14))  # concurrent
    assert any(changed([(s, WIDE), "same words"]) for s in (21, 22))  # A / B / A
    assert changed(CASES["two-sizes"])  # two images
    w = ask(engine, 5)
    assert answer(w) == ref.one(5)[0]
    worker: Any = vision_worker(engine, MODEL)
    feats = list(worker.features.entries.values())
    assert feats and all(len(f.deep) == len(DEEPSTACK_INDEXES) for f in feats)
    assert all(d.shape == f.main.shape for f in feats for d in f.deep)  # a row per image token, per layer


def test_single_request_equals_mlx_vlm(engine: Engine, ref: Qwen3Reference) -> None:
    want, prompt_tokens = ref.one(3)
    w = ask(engine, 3)
    assert answer(w) == want
    # prompt_eval_count counts the image's tokens as the processor expands them
    assert started(w).prompt_tokens == prompt_tokens
    assert isinstance(w.seen[-1], Done) and w.seen[-1].usage.prompt_tokens == prompt_tokens


def test_concurrent_images_and_text_share_the_batch(engine: Engine, ref: Qwen3Reference) -> None:
    """Four rows with different images (different rope deltas, deepstack on each) and a text row in one batch."""
    seeds = [11, 12, 13, 14]
    wants = {s: ref.one(s)[0] for s in seeds}

    text_want = answer(text_request(engine, MODEL))
    waiters = [ask(engine, s) for s in seeds]
    text = text_request(engine, MODEL)
    assert {s: answer(w) for s, w in zip(seeds, waiters, strict=True)} == wants
    assert answer(text) == text_want
    assert len(set(wants.values())) > 1  # the images really steer the answers


def test_image_a_then_b_then_a_never_reuses_the_wrong_image(engine: Engine, ref: Qwen3Reference) -> None:
    a, b = ref.one(21, "same words"), ref.one(22, "same words")
    assert a[0] != b[0]
    first = ask(engine, 21, "same words")
    assert answer(first) == a[0]
    second = ask(engine, 22, "same words")
    assert answer(second) == b[0]
    # Same text, same placeholder tokens: the prompt cache may only reuse what comes before the image.
    first_image = engine.preparer.prepare_vision(second.request)[1].images[0].positions[0]
    assert started(second).cached_tokens <= first_image
    third = ask(engine, 21, "same words")
    assert answer(third) == a[0]
    assert started(third).cached_tokens > first_image  # A's own cache is found again


def test_two_images_of_different_sizes_between_text(engine: Engine, ref: Qwen3Reference) -> None:
    """Two grids in one prompt: the second image's positions and the decode delta follow the first's grid."""
    parts = CASES["two-sizes"]
    w = submit(engine, message_request(parts))
    assert (answer(w), started(w).prompt_tokens) == ref.parts(parts)


def test_chunked_prefill_splits_images_and_their_deepstack_rows(
    model_dir: Path, ref: Qwen3Reference, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """5-token chunks: each image's rows (main and every deepstack layer) and positions span several chunks."""
    e = start_engine(tmp_path_factory.mktemp("cfg"), {MODEL: model_dir}, prefill_chunk=5)
    try:
        cases: list[list[Part]] = [[(3, WIDE), "describe"], CASES["two-sizes"]]
        waiters = [submit(e, message_request(parts)) for parts in cases]
        for parts, w in zip(cases, waiters, strict=True):
            assert (answer(w), started(w).prompt_tokens) == ref.parts(parts)
    finally:
        e.stop()


def test_a_fresh_process_loads_the_qwen3_vl_processor(model_dir: Path) -> None:
    """The preparation stage loads the processor before anything imports mlx_vlm.models.qwen3_vl, whose import
    registers mlx-vlm's numpy Qwen3VLProcessor with AutoProcessor; without it transformers' own processor is
    picked, which needs torch/torchvision. (In this test process the tiny checkpoint's builder has imported the
    module already, so the engine tests above do not see this.)"""
    code = (
        "import json, sys; from pathlib import Path\n"
        "from mlx_server.engine.prepare.vision import VisionProcessor\n"
        "path = Path(sys.argv[1])\n"
        "vp = VisionProcessor.load(path, json.loads((path / 'config.json').read_text()))\n"
        "print(type(vp.processor).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["Qwen3VLProcessor"]
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == MODEL
