"""Tiny random-weight vision-language models that the real ``mlx_vlm.load`` accepts.

Like ``tinymodels.py`` for text models: nothing may come from the Hugging
Face hub, so each builder writes a complete, tiny checkpoint folder that
``mlx_vlm.utils.load(path)`` turns into the family's real mlx-vlm ``Model``
and the family's real processor, offline:

``config.json``
    HF-style config with ``text_config`` and ``vision_config`` (hidden 64,
    2 layers, a few heads, the locally trained ~500-token vocabulary).
``model.safetensors``
    float32 weights named exactly like the parameters of the mlx-vlm
    ``Model`` built from that config (mlx layout, so every ``sanitize`` is a
    no-op on them), random with a fixed seed.
``tokenizer.json`` / ``tokenizer_config.json``
    a byte-level BPE trained here (``support.tinymodels.build_tokenizer``)
    carrying the family's image tokens as added special tokens, and a chat
    template placing ``{"type": "image"}`` parts the way the real family
    template does.
``preprocessor_config.json`` / ``processor_config.json``
    whatever the family's processor needs to build offline, sized so one
    image makes only a handful of image tokens.

Images matter: the first-step logits change with the image (see
``tests/test_tinyvlms.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from support.tinymodels import build_tokenizer

# Init scales (see tinymodels.py for the reasoning): token embeddings of unit
# scale, projections with gain PROJ_GAIN / sqrt(fan_in) so activations keep a
# useful size through the tiny stacks, small random biases.
EMBED_STD = 1.0
PROJ_GAIN = 2.5
BIAS_STD = 0.2
# Rows of the output head for special tokens (EOS, image tokens, ...) are
# shrunk so greedy decoding of a random model does not stop at once.
SPECIAL_ROW_SCALE = 0.1

# CLIP normalisation constants, as in the real LLaVA preprocessor config.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA 1.5 (llava-hf) template: "USER: <image>\n<text> ASSISTANT:"; images
# of a turn come first, then its text parts, each followed by a space.
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}"
    "{{ '<image>\\n' }}"
    "{%- endfor -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ content['text'] + ' ' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Qwen2-VL template: ChatML with a default system turn; each image part
# becomes <|vision_start|><|image_pad|><|vision_end|> in place, and the
# processor repeats <|image_pad|> once per merged patch.
QWEN2_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' + image_count.value | string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' + video_count.value | string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content -%}"
    "{{ content['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3) template: BOS written by the
# template, "User:<image>text<end_of_utterance>\n", no space after the colon
# when the turn starts with an image, parts in their given order.
IDEFICS3_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{%- if message['content'] is string -%}"
    "{{ ': ' + message['content'] }}"
    "{%- else -%}"
    "{%- if message['content'] and message['content'][0]['type'] == 'image' -%}{{ ':' }}"
    "{%- else -%}{{ ': ' }}{%- endif -%}"
    "{%- for line in message['content'] -%}"
    "{%- if line['type'] == 'text' -%}{{ line['text'] }}"
    "{%- elif line['type'] == 'image' -%}{{ '<image>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def sample_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic RGB image (``size`` is PIL's (width, height)); different
    seeds give clearly different pictures: a colour gradient plus noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-4, 4, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img = img + rng.normal(0, 24, size=(height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _added_ids(out_dir: Path) -> tuple[dict[str, int], int]:
    """Added-token ids and the full vocabulary size of the saved tokenizer."""
    tok_json = json.loads((out_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    vocab_size = 1 + max([*tok_json["model"]["vocab"].values(), *added.values()])
    return added, vocab_size


def _prepend_bos(out_dir: Path, bos_token: str) -> None:
    """Make the saved tokenizer add ``bos_token`` when asked for special
    tokens (``add_special_tokens=True``), like Llama/LLaVA tokenizers do."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    bos_id = tok.token_to_id(bos_token)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos_token} $A",
                pair=f"{bos_token} $A {bos_token} $B",
                special_tokens=[(bos_token, bos_id)],
            ),
        ]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    _write_json(out_dir / "tokenizer_config.json", config)


def _build_model(config: dict[str, Any]):
    """The mlx-vlm ``Model`` for ``config``, configured the way
    ``mlx_vlm.utils.load_model`` configures it."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    config = json.loads(json.dumps(config))
    arch, _ = get_model_and_args(config)
    config.setdefault("text_config", {})
    config.setdefault("vision_config", {})
    model_config = arch.ModelConfig.from_dict(config)
    modules = ["text", "vision", "perceiver", "projector", "audio"]
    model_config = update_module_configs(model_config, arch, config, modules)
    return arch.Model(model_config)


def _random_weights(
    config: dict[str, Any], *, seed: int, head_name: str, special_ids: list[int]
) -> dict[str, mx.array]:
    """Random float32 weights for every parameter of the mlx-vlm model.

    Norm layers start as identity (weight 1, bias 0), embeddings with unit
    std, other matrices/convolutions with gain PROJ_GAIN / sqrt(fan_in)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = _build_model(config)
    modules = dict(model.named_modules())
    key = mx.random.key(seed)
    weights: dict[str, mx.array] = {}
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        is_norm = owner is not None and "norm" in type(owner).__name__.lower()
        shape = param.shape
        if is_norm:
            value = mx.ones(shape) if leaf == "weight" else mx.zeros(shape)
        elif leaf == "bias":
            value = mx.random.normal(shape, key=sub) * BIAS_STD
        elif isinstance(owner, nn.Embedding) or len(shape) < 2:
            value = mx.random.normal(shape, key=sub) * EMBED_STD
        else:
            fan_in = math.prod(shape[1:])
            value = mx.random.normal(shape, key=sub) * (PROJ_GAIN / fan_in**0.5)
        weights[name] = value.astype(mx.float32)
    head = weights[head_name]
    row_scale = mx.ones((head.shape[0], 1))
    row_scale[mx.array(special_ids)] = SPECIAL_ROW_SCALE
    weights[head_name] = head * row_scale
    return weights


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def _finish(out_dir: Path, config: dict[str, Any], *, seed: int, head_name: str, special_ids: list[int]) -> Path:
    _write_json(out_dir / "config.json", config)
    weights = _random_weights(config, seed=seed, head_name=head_name, special_ids=special_ids)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out_dir


LM_HEAD = "language_model.lm_head.weight"


def _start(path: Path, *, prepend_bos: str | None = None, **tokenizer: Any) -> tuple[Path, dict[str, int], int]:
    """A builder's first steps: the folder, the tokenizer (``build_tokenizer``'s arguments; ``prepend_bos`` makes
    it add that BOS, for templates that write none), and its added-token ids and vocabulary size."""
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, **tokenizer)
    if prepend_bos is not None:
        _prepend_bos(out_dir, prepend_bos)
    added, vocab_size = _added_ids(out_dir)
    return out_dir, added, vocab_size


def _write_processor(out_dir: Path, preprocessor: dict[str, Any], processor: dict[str, Any]) -> None:
    _write_json(out_dir / "preprocessor_config.json", preprocessor)
    _write_json(out_dir / "processor_config.json", processor)


def _finish_lm(out_dir: Path, config: dict[str, Any], *, seed: int, added: dict[str, int]) -> Path:
    """``_finish`` for the usual layout: the head at ``language_model.lm_head``, every added token special."""
    return _finish(out_dir, config, seed=seed, head_name=LM_HEAD, special_ids=sorted(added.values()))


def _clip_vision_config(image_size: int, patch_size: int) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": 64,
        "num_channels": 3,
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
    }


def _clip_processor(out_dir: Path, processor_class: str, image_size: int, patch_size: int, **image: Any) -> None:
    """CLIP-style preprocessing (``image``: the image processor's type and any further settings) and a llava-style
    processor config, as llava and llava_next write them."""
    _write_processor(
        out_dir,
        {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": processor_class,
            "do_resize": True,
            "size": {"shortest_edge": image_size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_convert_rgb": True,
            **image,
        },
        {
            "processor_class": processor_class,
            "image_token": "<image>",
            "patch_size": patch_size,
            "vision_feature_select_strategy": "default",
            # The CLS position, which "default" then drops again.
            "num_additional_image_tokens": 1,
        },
    )


def _llava_config(model_type: str, architecture: str, added: dict[str, int], vocab_size: int, **extra: Any):
    """The root of a llava-style config up to its text and vision configs (``extra``: after the image token)."""
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "image_token_index": added["<image>"],
        **extra,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "vocab_size": vocab_size,
        "eos_token_id": added["</s>"],
        "bos_token_id": added["<s>"],
        "pad_token_id": added["<|endoftext|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def _qwen_vl_token_ids(added: dict[str, int]) -> dict[str, int]:
    """The vision and special token ids a Qwen-VL config carries at its root."""
    return {
        "image_token_id": added["<|image_pad|>"],
        "video_token_id": added["<|video_pad|>"],
        "vision_start_token_id": added["<|vision_start|>"],
        "vision_end_token_id": added["<|vision_end|>"],
        "bos_token_id": added["<|endoftext|>"],
        "eos_token_id": added["<|im_end|>"],
        "pad_token_id": added["<|endoftext|>"],
    }


def _qwen_vl_processor(
    out_dir: Path,
    processor_class: str,
    image_settings: dict[str, Any],
    *,
    image_type: str,
    video_type: str,
    **video: Any,
) -> None:
    """mlx-vlm's Qwen-VL processors build their own numpy image (and video) processors from these files and ask
    the hub for whichever of them is missing, so all three are written (``video``: further video settings)."""
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": image_type,
            "processor_class": processor_class,
            "do_resize": True,
            "resample": 3,
            **image_settings,
        },
    )
    _write_json(
        out_dir / "video_preprocessor_config.json",
        {
            "video_processor_type": video_type,
            "processor_class": processor_class,
            "do_resize": True,
            "resample": 3,
            **video,
            **image_settings,
        },
    )
    _write_json(out_dir / "processor_config.json", {"processor_class": processor_class})


def _llama_text_config(vocab_size: int, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        **extra,
    }


def build_llava(path: Path, *, seed: int = 0) -> Path:
    """LLaVA 1.5 style (model_type "llava"): CLIP vision tower (32x32 input,
    8x8 patches, so every image becomes 16 ``<image>`` tokens after the CLS
    token is dropped), 2-layer MLP projector, llama text model.  The prompt
    carries one ``<image>`` per image; ``LlavaProcessor`` expands it."""
    image_size, patch_size = 32, 8
    # The chat template writes no BOS: the tokenizer adds it, as in llava-hf.
    out_dir, added, vocab_size = _start(
        path,
        chat_template=LLAVA_TEMPLATE,
        extra_special=("<image>",),
        eos_token="</s>",
        bos_token="<s>",
        prepend_bos="<s>",
    )
    config = {
        **_llava_config("llava", "LlavaForConditionalGeneration", added, vocab_size),
        "text_config": _llama_text_config(vocab_size),
        "vision_config": _clip_vision_config(image_size, patch_size),
    }
    _clip_processor(out_dir, "LlavaProcessor", image_size, patch_size)
    return _finish_lm(out_dir, config, seed=seed, added=added)


QWEN2_VL_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Shared by the Qwen2-VL and Qwen2.5-VL builders: 8 px patches merged 2x2
# (resize factor 16), temporal patches of 2 frames, a pixel budget of
# [1024, 4096] (4..16 image tokens).
QWEN_VL_PATCH_SIZE = 8
QWEN_VL_MERGE_SIZE = 2
QWEN_VL_TEMPORAL_PATCH_SIZE = 2


def _build_qwen_vl(
    path: Path,
    *,
    seed: int,
    model_type: str,
    architecture: str,
    processor_class: str,
    vision_config: dict[str, Any],
) -> Path:
    """What the Qwen2-VL family's checkpoints share: the tokenizer with the
    vision tokens, the ChatML template with vision markers, a qwen2 text
    model with mRoPE (sections [2, 3, 3] of the 8 rotary frequencies), the
    numpy image/video processor configs and the token ids at the root."""
    patch_size, merge_size = QWEN_VL_PATCH_SIZE, QWEN_VL_MERGE_SIZE
    temporal_patch_size = QWEN_VL_TEMPORAL_PATCH_SIZE
    min_pixels = (patch_size * merge_size) ** 2 * 4
    max_pixels = (patch_size * merge_size) ** 2 * 16
    out_dir, added, vocab_size = _start(path, chat_template=QWEN2_VL_TEMPLATE, extra_special=QWEN2_VL_SPECIAL)
    text = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "sliding_window": 4096,
        "use_sliding_window": False,
    }
    config = {
        **text,
        "architectures": [architecture],
        **_qwen_vl_token_ids(added),
        "torch_dtype": "float32",
        # Newer transformers nest the text settings; mlx-vlm reads the root.
        "text_config": {**text, "model_type": f"{model_type}_text"},
        "vision_config": {
            "model_type": model_type,
            **vision_config,
            "in_chans": 3,
            "in_channels": 3,
            "patch_size": patch_size,
            "spatial_patch_size": patch_size,
            "spatial_merge_size": merge_size,
            "temporal_patch_size": temporal_patch_size,
        },
    }
    image_settings = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": merge_size,
    }
    # The real Qwen2.5-VL checkpoints keep the Qwen2-VL image/video processor types too.
    _qwen_vl_processor(
        out_dir,
        processor_class,
        image_settings,
        image_type="Qwen2VLImageProcessor",
        video_type="Qwen2VLVideoProcessor",
    )
    return _finish_lm(out_dir, config, seed=seed, added=added)


def build_qwen2_vl(path: Path, *, seed: int = 0) -> Path:
    """Qwen2-VL style (model_type "qwen2_vl"): 3D-patch ViT with 2x2 patch
    merger, qwen2 text model with mRoPE (sections [2, 3, 3] of the 8 rotary
    frequencies).  Patches are 8 px, so the resize factor is 16 and the
    pixel budget [1024, 4096] gives 4..16 image tokens; a 64x48 image stays
    64x48: grid_thw [1, 6, 8], 48 patches, 12 ``<|image_pad|>`` tokens."""
    return _build_qwen_vl(
        path,
        seed=seed,
        model_type="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
        },
    )


def build_qwen2_5_vl(path: Path, *, seed: int = 0) -> Path:
    """Qwen2.5-VL style (model_type "qwen2_5_vl"): the Qwen2-VL checkpoint
    layout (tokenizer, template, processor files, mRoPE qwen2 text model)
    with the Qwen2.5 vision tower: RMSNorm blocks with a SwiGLU MLP, window
    attention except in the ``fullatt_block_indexes`` blocks, and a merger
    projecting to ``out_hidden_size`` (the text hidden size).

    Of the 2 vision blocks, block 0 attends within windows and block 1 over
    the whole image.  ``window_size`` 32 px is 4x4 patches, i.e. 2x2 merged
    tokens.  A 64x48 image gives grid_thw [1, 6, 8] (48 patches, 12
    ``<|image_pad|>`` tokens on a 3x4 merged grid), which the windowing
    pads to 4x6 and cuts into windows of 4, 4, 2 and 2 merged tokens (plus
    two empty ones, which mlx-vlm drops)."""
    return _build_qwen_vl(
        path,
        seed=seed,
        model_type="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 2,
            "hidden_act": "silu",
            "window_size": 2 * QWEN_VL_MERGE_SIZE * QWEN_VL_PATCH_SIZE,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    )


IDEFICS3_SPECIAL = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")


def build_idefics3(path: Path, *, seed: int = 0) -> Path:
    """Idefics3 style (model_type "idefics3"): SigLIP-like vision tower on
    48x48 inputs with 8x8 patches (36 patches), pixel-shuffle connector with
    scale_factor 2, llama text model.  Image splitting is off, so any image
    is resized to one 48x48 tile and expands to
    ``<fake_token_around_image><global-img>`` + 9 ``<image>`` +
    ``<fake_token_around_image>``."""
    image_size, patch_size, scale_factor = 48, 8, 2
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    out_dir, added, vocab_size = _start(
        path,
        chat_template=IDEFICS3_TEMPLATE,
        extra_special=("<|begin_of_text|>", *IDEFICS3_SPECIAL),
        eos_token="<end_of_utterance>",
        bos_token="<|begin_of_text|>",
    )
    config = {
        "model_type": "idefics3",
        "architectures": ["Idefics3ForConditionalGeneration"],
        "image_token_id": added["<image>"],
        "scale_factor": scale_factor,
        "vocab_size": vocab_size,
        "bos_token_id": added["<|begin_of_text|>"],
        "eos_token_id": added["<end_of_utterance>"],
        "pad_token_id": added["<|endoftext|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": _llama_text_config(vocab_size, rope_theta=500000.0),
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
        },
    }
    _write_processor(
        out_dir,
        {
            "image_processor_type": "Idefics3ImageProcessor",
            "processor_class": "Idefics3Processor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"longest_edge": image_size},
            "resample": 1,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_pad": True,
            "do_image_splitting": False,
            "max_image_size": {"longest_edge": image_size},
        },
        {"processor_class": "Idefics3Processor", "image_seq_len": image_seq_len},
    )
    return _finish_lm(out_dir, config, seed=seed, added=added)


# The token each image expands to (repeated) in the processed prompt, and how
# many of them one ``sample_image()`` (64x48) makes: llava and idefics3 resize
# every image to one fixed tile, qwen2_vl and qwen2_5_vl keep the 64x48 size
# (grid 6x8 patches, merged 2x2).  idefics3 also wraps them in
# <fake_token_around_image><global-img> ... <fake_token_around_image>.
IMAGE_TOKENS = {
    "llava": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "idefics3": "<image>",
}
SAMPLE_IMAGE_TOKEN_COUNTS = {"llava": 16, "qwen2_vl": 12, "qwen2_5_vl": 12, "idefics3": 9}

VLM_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": build_llava,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "idefics3": build_idefics3,
}
