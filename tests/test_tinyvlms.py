"""The tiny vision-language checkpoints load and run in the real mlx_vlm.

Each family is built once per module, loaded with ``mlx_vlm.load`` and run
greedily on a sample image.  Images must matter: a different image changes
the first-step logits.  The llava trap (mlx_vlm passes ``padding=True`` to
the transformers image processor, which rejects it) is pinned down, with the
workaround used here: call the processor without ``padding`` and hand the
prepared tensors to ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from support.tinyvlm import IMAGE_TOKENS, SAMPLE_IMAGE_TOKEN_COUNTS, VLM_BUILDERS, sample_image

PROMPT = "Describe the picture."

# What mlx_vlm.prompt_utils.apply_chat_template makes of PROMPT with one image.
CHAT_PROMPTS = {
    "llava": "USER: <image>\nDescribe the picture. ASSISTANT:",
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nDescribe the picture.<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # mlx-vlm formats qwen2_5_vl messages image first (LIST_WITH_IMAGE_FIRST),
    # qwen2_vl ones text first.
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the picture.<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "idefics3": "<|begin_of_text|>User:<image>Describe the picture.<end_of_utterance>\nAssistant:",
}

# Processor outputs besides input_ids / attention_mask, with their shapes for
# one sample image.
IMAGE_INPUTS = {
    "llava": {"pixel_values": (1, 3, 32, 32)},
    "qwen2_vl": {"pixel_values": (48, 3 * 2 * 8 * 8), "image_grid_thw": (1, 3)},
    "qwen2_5_vl": {"pixel_values": (48, 3 * 2 * 8 * 8), "image_grid_thw": (1, 3)},
    "idefics3": {"pixel_values": (1, 1, 3, 48, 48), "pixel_attention_mask": (1, 1, 48, 48)},
}


@pytest.fixture(scope="module", params=sorted(VLM_BUILDERS))
def vlm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    import mlx_vlm

    family = request.param
    path = VLM_BUILDERS[family](tmp_path_factory.mktemp(f"tiny-{family}"))
    model, processor = mlx_vlm.load(str(path))
    return family, model, processor


def chat_prompt(model: Any, processor: Any) -> str:
    from mlx_vlm.prompt_utils import apply_chat_template

    return apply_chat_template(processor, model.config, PROMPT, num_images=1)


def prepared_inputs(processor: Any, prompt: str, image_seed: int) -> dict[str, mx.array]:
    """The processor call mlx_vlm.generate makes, minus ``padding=True``
    (which llava's image processor rejects); mlx_vlm's processors return
    mx arrays whatever ``return_tensors`` says."""
    return dict(processor(text=[prompt], images=[sample_image(image_seed)]))


def generate_kwargs(inputs: dict[str, mx.array]) -> dict[str, Any]:
    """Prepared inputs in the form ``mlx_vlm.generate`` takes them: it then
    skips its own processing and passes the extra keys to the model."""
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    return dict(
        input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], mask=inputs["attention_mask"], **extra
    )


def first_step_logprobs(model: Any, processor: Any, prompt: str, image_seed: int) -> np.ndarray:
    from mlx_vlm import stream_generate

    inputs = prepared_inputs(processor, prompt, image_seed)
    response = next(stream_generate(model, processor, prompt, max_tokens=1, temperature=0.0, **generate_kwargs(inputs)))
    return np.array(response.logprobs.astype(mx.float32)).reshape(-1)


def test_sample_image_is_deterministic() -> None:
    a, b, c = sample_image(0), sample_image(0), sample_image(1)
    assert a.size == (64, 48) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert sample_image(3, size=(20, 10)).size == (20, 10)


def test_loads_the_family_processor(vlm: tuple[str, Any, Any]) -> None:
    family, model, processor = vlm
    assert model.config.model_type == family
    # mlx_vlm silently falls back to transformers' AutoProcessor when its own
    # processor fails to build; make sure the mlx_vlm one was built.
    assert type(processor).__module__.startswith(f"mlx_vlm.models.{family}.")
    # Every token id the processor can produce has an embedding row.
    assert len(processor.tokenizer) == model.config.vocab_size


def test_chat_template_places_the_image(vlm: tuple[str, Any, Any]) -> None:
    family, model, processor = vlm
    assert chat_prompt(model, processor) == CHAT_PROMPTS[family]


def test_processor_expands_image_tokens(vlm: tuple[str, Any, Any]) -> None:
    family, model, processor = vlm
    inputs = prepared_inputs(processor, chat_prompt(model, processor), 0)
    token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[family])
    ids = np.array(inputs["input_ids"])
    assert ids.shape[0] == 1 and np.array(inputs["attention_mask"]).shape == ids.shape
    assert int((ids == token_id).sum()) == SAMPLE_IMAGE_TOKEN_COUNTS[family]
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    assert shapes == IMAGE_INPUTS[family]


def test_generate_greedy_with_image(vlm: tuple[str, Any, Any]) -> None:
    import mlx_vlm

    family, model, processor = vlm
    prompt = chat_prompt(model, processor)
    if family == "llava":
        # See test_llava_generate_with_image_hits_padding_trap.
        result = mlx_vlm.generate(
            model,
            processor,
            prompt,
            max_tokens=8,
            temperature=0.0,
            **generate_kwargs(prepared_inputs(processor, prompt, 0)),
        )
    else:
        result = mlx_vlm.generate(model, processor, prompt, image=[sample_image(0)], max_tokens=8, temperature=0.0)
        # The prepared-inputs path (what a server would do) gives the same tokens.
        again = mlx_vlm.generate(
            model,
            processor,
            prompt,
            max_tokens=8,
            temperature=0.0,
            **generate_kwargs(prepared_inputs(processor, prompt, 0)),
        )
        assert again.token_ids == result.token_ids
    assert result.generation_tokens > 0 and len(result.token_ids) == result.generation_tokens
    # The prompt as the model saw it: text plus the expanded image tokens.
    assert result.prompt_tokens == prepared_inputs(processor, prompt, 0)["input_ids"].size


def test_image_changes_first_step_logits(vlm: tuple[str, Any, Any]) -> None:
    _, model, processor = vlm
    prompt = chat_prompt(model, processor)
    a = first_step_logprobs(model, processor, prompt, 0)
    again = first_step_logprobs(model, processor, prompt, 0)
    b = first_step_logprobs(model, processor, prompt, 1)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, again, atol=1e-5)
    assert np.abs(a - b).max() > 0.05
    # Not degenerate: the distribution is far from one-hot and from uniform.
    assert -8.0 < a.max() < -0.05 and a.std() > 0.5


@pytest.mark.parametrize("vlm", ["llava"], indirect=True)
def test_llava_generate_with_image_hits_padding_trap(vlm: tuple[str, Any, Any]) -> None:
    """mlx_vlm.utils.process_inputs passes padding=True to the processor;
    LlavaProcessor forwards its kwargs to transformers' CLIP image processor,
    whose typed-kwargs check rejects ``padding``.  If this starts passing,
    mlx-vlm (or transformers) fixed it and the workaround can go."""
    import mlx_vlm

    _, model, processor = vlm
    with pytest.raises(ValueError, match="unexpected keyword argument 'padding'"):
        mlx_vlm.generate(model, processor, chat_prompt(model, processor), image=[sample_image(0)], max_tokens=1)


def numpy_inputs(family: str, processor: Any, prompt: str, image_seed: int) -> dict[str, np.ndarray]:
    """The same model inputs without touching MLX (mlx_vlm's processors
    always convert to mx.array): the image processor and the tokenizer are
    called directly with return_tensors="np", and the prompt's image token is
    expanded the way the family's processor does it."""
    image = sample_image(image_seed)
    token = IMAGE_TOKENS[family]
    if family == "idefics3":
        pixels = dict(processor.image_processor([[image]], return_row_col_info=True, return_tensors="np"))
        rows, cols = pixels.pop("rows"), pixels.pop("cols")
        assert rows == [[0]] and cols == [[0]]  # image splitting is off
        n = processor.image_seq_len
        fake = "<fake_token_around_image>"
        expanded = prompt.replace(token, f"{fake}<global-img>{token * n}{fake}")
    else:
        pixels = dict(processor.image_processor([image], return_tensors="np"))
        if family in ("qwen2_vl", "qwen2_5_vl"):
            n = int(np.prod(pixels["image_grid_thw"][0])) // processor.image_processor.merge_size**2
        else:
            n = SAMPLE_IMAGE_TOKEN_COUNTS[family]
        expanded = prompt.replace(token, token * n)
    text = dict(processor.tokenizer([expanded], return_tensors="np"))
    return {**text, **pixels}


def test_numpy_inputs_equal_processor_inputs(vlm: tuple[str, Any, Any]) -> None:
    family, model, processor = vlm
    prompt = chat_prompt(model, processor)
    reference = prepared_inputs(processor, prompt, 1)
    arrays = numpy_inputs(family, processor, prompt, 1)
    assert sorted(arrays) == sorted(reference)
    for key, value in arrays.items():
        assert isinstance(value, np.ndarray), key
        expected = np.array(reference[key])
        assert value.dtype == expected.dtype and np.array_equal(value, expected), key


def test_builders_write_a_checkpoint_folder(vlm: tuple[str, Any, Any]) -> None:
    family, model, _ = vlm
    path = Path(model.model_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert (path / "preprocessor_config.json").is_file()
    weights = mx.load(str(path / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())
