"""moondream2 vision requests on the real engine, on a tiny random-weight checkpoint: the prompt is mlx-vlm's
Moondream processor's (BOS, 729 image positions, the question block, the answer marker), and the answers equal
the model's own forward token for token: mlx-vlm's `Model.__call__`, whose 4-D mask lets BOS and the image attend
to each other both ways. That prefix goes through in one pass; the test that the mask matters compares against
the same forward with a causal mask (what mlx-vlm 0.7.10's generate runs: it drops the mask)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.contract.events import Done, Failed
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.engine import Engine
from support.enginetools import Waiter
from support.tinyvlm import sample_image
from support.tinyvlm_moondream2 import build_moondream2
from support.vlm_reference import GREEDY, MAX_TOKENS, answer, b64, image_request, start_engine, started, submit

MODEL = "moondream"
SMALL = (64, 48)  # a global crop and one tile
WIDE = (800, 400)  # a global crop and two tiles, stitched and pooled


class Oracle:
    """Greedy answers from mlx-vlm's own moondream2 forward over the whole sequence (no cache), from the inputs
    mlx-vlm's Moondream processor makes."""

    def __init__(self, path: Path) -> None:
        from mlx_vlm.models.moondream3.processing_moondream3 import Moondream3Processor
        from mlx_vlm.utils import load_model

        self.model = load_model(path)
        self.processor = Moondream3Processor.from_pretrained(str(path))
        wrapper = load_tokenizer(path)
        self.eos = set(wrapper.eos_token_ids)
        self.wrapper = wrapper

    def inputs(
        self, text: str, seed: Optional[int], size: tuple[int, int] = SMALL, raw: bool = False
    ) -> dict[str, Any]:
        if raw:  # what the processor makes of text alone
            return dict(self.processor(text=[text]))
        if seed is None:  # without an image the server keeps the question block
            from mlx_vlm.models.moondream3.processing_moondream3 import ANSWER_ID

            tok = self.processor.tokenizer
            block = tok.encode(f"\n\nQuestion: {text}\n\nAnswer: ", add_special_tokens=False)
            return {"input_ids": np.array([[tok.bos_token_id, *block, ANSWER_ID]])}
        return dict(self.processor(text=[text], images=[sample_image(seed, size)]))

    def __call__(
        self, text: str, seed: Optional[int], size: tuple[int, int] = SMALL, causal: bool = False, raw: bool = False
    ) -> tuple[str, int]:
        inputs = self.inputs(text, seed, size, raw)
        ids = mx.array(inputs["input_ids"])
        if seed is not None:
            out = self.model.get_input_embeddings(
                ids,
                mx.array(inputs["pixel_values"]),
                num_crops=inputs["num_crops"],
                crop_layouts=inputs["crop_layouts"],
            )
            embeds, prefix = out.inputs_embeds, 1 + (ids.shape[1] - 1 - self._text_len(inputs))
        else:
            embeds, prefix = self.model.text.model.embed_tokens(ids), 0
        tokens: list[int] = []
        for _ in range(MAX_TOKENS):
            n = embeds.shape[1]
            mask = self.model._create_prefix_attention_mask(n, prefix if not causal else 0, embeds.dtype)
            logits = self.model.text(ids, inputs_embeds=embeds, mask=mask).logits
            token = int(mx.argmax(logits[0, -1]).item())
            tokens.append(token)
            if token in self.eos:
                break
            embeds = mx.concatenate([embeds, self.model.text.model.embed_tokens(mx.array([[token]]))], axis=1)
        detok = self.wrapper.detokenizer
        detok.reset()
        for t in tokens:
            if t in self.eos:
                break
            detok.add_token(t)
        detok.finalize()
        return detok.text, int(ids.shape[1])

    def _text_len(self, inputs: dict[str, Any]) -> int:
        from mlx_vlm.models.moondream3.processing_moondream3 import NUM_VISION_TOKENS

        return int(inputs["input_ids"].shape[1]) - 1 - NUM_VISION_TOKENS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_moondream2(tmp_path_factory.mktemp("moondream") / "tiny")


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(tmp_path_factory.mktemp("cfg"), {MODEL: model_dir})
    yield e
    e.stop()


def ask(engine: Engine, seed: int, text: str = "what is this?", size: tuple[int, int] = SMALL) -> Waiter:
    return submit(engine, image_request(MODEL, text, [b64(sample_image(seed, size))]))


def test_prompt_is_the_moondream_processors(engine: Engine, oracle: Oracle) -> None:
    for size in (SMALL, WIDE):
        _, prompt = engine.preparer.prepare_vision(image_request(MODEL, "what is this?", [b64(sample_image(2, size))]))
        want = oracle.inputs("what is this?", 2, size)
        assert prompt.tokens == np.asarray(want["input_ids"])[0].tolist()
        [image] = prompt.images
        assert image.positions == tuple(range(1, 730)) and prompt.prefix == 730
        np.testing.assert_array_equal(image.arrays["pixel_values"], np.asarray(want["pixel_values"]))
        assert int(image.arrays["num_crops"][0]) == want["num_crops"][0] == (2 if size == SMALL else 3)
        assert all(type(v) is np.ndarray for v in image.arrays.values())  # no MLX arrays off the inference thread


@pytest.mark.parametrize("size", [SMALL, WIDE], ids=["small", "wide"])
def test_answers_equal_the_models_own_forward(engine: Engine, oracle: Oracle, size: tuple[int, int]) -> None:
    want, prompt_tokens = oracle("what is this?", 5, size)
    w = ask(engine, 5, size=size)
    assert answer(w) == want
    assert started(w).prompt_tokens == prompt_tokens


def test_the_two_way_prefix_matters(oracle: Oracle) -> None:
    """If the server ran the prefix causally it would disagree with the forward the tests check against."""
    pairs = [(oracle("what is this?", s), oracle("what is this?", s, causal=True)) for s in (5, 6)]
    assert any(two_way != causal for two_way, causal in pairs)


def test_concurrent_images_and_text_share_the_batch(engine: Engine, oracle: Oracle) -> None:
    seeds = [11, 12, 13]
    wants = {s: oracle("what is this?", s)[0] for s in seeds}
    text_want = oracle("plain words", None)[0]
    waiters = [ask(engine, s) for s in seeds]
    text = submit(engine, GenerateRequest(model=MODEL, prompt="plain words", sampling=GREEDY, max_tokens=MAX_TOKENS))
    assert {s: answer(w) for s, w in zip(seeds, waiters, strict=True)} == wants
    assert len(set(wants.values())) > 1  # the images really steer the answers
    assert answer(text) == text_want


def test_image_a_then_b_then_a_and_the_prefix_cache(engine: Engine, oracle: Oracle) -> None:
    a, b = oracle("same words", 21)[0], oracle("same words", 22)[0]
    assert a != b
    first = ask(engine, 21, "same words")
    assert answer(first) == a
    second = ask(engine, 22, "same words")
    assert answer(second) == b
    assert started(second).cached_tokens == 0  # BOS alone matched: a two-way prefix is never reused in part
    third = ask(engine, 21, "another question")
    assert answer(third) == oracle("another question", 21)[0]
    assert started(third).cached_tokens >= 730  # A's BOS and image found again


def test_a_text_prompt_never_reuses_an_image_prompts_bos(
    model_dir: Path, oracle: Oracle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An image prompt's BOS attended to its image: a text prompt sharing only BOS starts from nothing. (Asked
    for q8 KV, which moondream2's attention cannot read, the model keeps f16.)"""
    fresh = start_engine(tmp_path_factory.mktemp("fresh"), {MODEL: model_dir}, kv_cache="q8")
    try:
        assert answer(ask(fresh, 5)) == oracle("what is this?", 5)[0]
        entry = fresh.core.pool.get(MODEL)
        assert entry is not None and entry.model.kv_cache == "f16"
        raw = GenerateRequest(model=MODEL, prompt="same words", raw=True, sampling=GREEDY, max_tokens=MAX_TOKENS)
        text = submit(fresh, raw)
        assert answer(text) == oracle("same words", None, raw=True)[0]
        assert started(text).cached_tokens == 0
    finally:
        fresh.stop()


def test_more_than_one_image_is_a_clear_400(engine: Engine) -> None:
    images = [b64(sample_image(31)), b64(sample_image(32))]
    w = submit(engine, image_request(MODEL, "compare", images))
    end = w.wait(60)
    assert isinstance(end, Failed) and end.error.status == 400
    assert "one image per request" in str(end.error)
    assert not isinstance(end, Done)


def test_a_tokenizer_that_is_not_the_models_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Upstream moondream2 bundles GPT-2's tokenizer (end of text 50256) beside a model whose end of text is 0."""
    import json
    import shutil

    from mlx_server.engine.prepare.vision import VisionProcessor

    stale = tmp_path / "stale"
    shutil.copytree(model_dir, stale)
    config = json.loads((stale / "config.json").read_text())
    config["eos_token_id"] = 0
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the tokenizer the model was trained with"):
        VisionProcessor.load(stale, config)
    assert VisionProcessor.load(model_dir, json.loads((model_dir / "config.json").read_text())).family.prefix
