"""A tiny random-weight Gemma 3 vision checkpoint that the real ``mlx_vlm.load`` accepts offline.

Same conventions as ``tinyvlm.py`` (whose helpers it uses): a locally trained tokenizer carrying Gemma 3's
tokens, Gemma 3's chat template, float32 weights named like the mlx-vlm ``Model``'s parameters, hidden 64,
2 layers.  The vision tower is SigLIP on 32x32 inputs with 8 px patches (a 4x4 grid), which the projector
average-pools 2x2 into ``mm_tokens_per_image`` = 4 soft tokens, so every image (any size: it is resized to
32x32) expands to ``\\n\\n<start_of_image>`` + 4 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.

The text model alternates a sliding-window layer (a ``RotatingKVCache`` of ``SLIDING_WINDOW`` tokens) and a
global one (``sliding_window_pattern`` 2), like Gemma 3's 5:1 pattern in miniature; the window is shorter than a
templated image prompt, so prefill and decode both run past it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from support.tinyvlm import (
    EMBED_STD,
    SPECIAL_ROW_SCALE,
    _added_ids,
    _random_weights,
    _start,
    _write_json,
    _write_processor,
)

# google/gemma-3-*-it's template: BOS written by the template, the system prompt folded into the first user
# turn, "model" for the assistant role, <start_of_image> where each image part goes, text parts trimmed.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

GEMMA3_SPECIAL = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

IMAGE_SIZE = 32  # the tower's input side: every image is resized to it
PATCH_SIZE = 8  # 4x4 patches
MM_TOKENS_PER_IMAGE = 4  # 2x2 after the projector's average pool: kernel (32 // 8) // 2 = 2
SLIDING_WINDOW = 16  # the sliding layers' window (a sample image prompt is ~20 tokens)
EMBED_STD_TIED = 0.1
POST_NORM = 2.0
QK_NORM = 1.0
HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


def build_gemma3(path: Path, *, seed: int = 0) -> Path:
    """Gemma 3 style (model_type "gemma3"): SigLIP vision tower, RMSNorm + average pool + projection
    (``Gemma3MultiModalProjector``), gemma3 text model with q/k norms, sliding-window and global layers."""
    out_dir, _, _ = _start(
        path,
        chat_template=GEMMA3_TEMPLATE,
        extra_special=GEMMA3_SPECIAL,
        eos_token="<end_of_turn>",
        bos_token="<bos>",
    )
    # Gemma's tokenizer names its image tokens (Gemma3Processor reads tokenizer.boi_token, .eoi_token,
    # .image_token and .image_token_id); the chat template writes BOS itself, so the tokenizer adds none.
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_config["extra_special_tokens"] = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok_config.pop("additional_special_tokens", None)
    tok_config["pad_token"] = "<pad>"
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    added, vocab_size = _added_ids(out_dir)
    text = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
        "rope_global_base_freq": 1000000.0,
        "sliding_window": SLIDING_WINDOW,
        "sliding_window_pattern": 2,
        "mm_tokens_per_image": MM_TOKENS_PER_IMAGE,
        "max_position_embeddings": 4096,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "image_token_index": added["<image_soft_token>"],
        "boi_token_index": added["<start_of_image>"],
        "eoi_token_index": added["<end_of_image>"],
        "mm_tokens_per_image": MM_TOKENS_PER_IMAGE,
        # mlx-vlm divides the image features by sqrt(hidden_size) (the text model multiplies its input by it)
        "hidden_size": text["hidden_size"],
        "vocab_size": vocab_size,
        "bos_token_id": added["<bos>"],
        "eos_token_id": [added["<eos>"], added["<end_of_turn>"]],
        "pad_token_id": added["<pad>"],
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        },
    }
    _write_processor(
        out_dir,
        {
            "image_processor_type": "Gemma3ImageProcessor",
            "processor_class": "Gemma3Processor",
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_pan_and_scan": None,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": SIGLIP_MEAN,
            "image_std": SIGLIP_STD,
            "image_seq_length": MM_TOKENS_PER_IMAGE,
            "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_crop_size": None,
            "pan_and_scan_min_ratio_to_activate": None,
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        },
        {"processor_class": "Gemma3Processor", "image_seq_length": MM_TOKENS_PER_IMAGE},
    )
    _write_json(out_dir / "config.json", config)
    special = sorted(added.values())
    weights = _random_weights(config, seed=seed, head_name=HEAD, special_ids=special)
    mx.save_safetensors(
        str(out_dir / "model.safetensors"), _gemma_weights(weights, special), metadata={"format": "mlx"}
    )
    return out_dir


def _gemma_weights(weights: dict[str, mx.array], special_ids: list[int]) -> dict[str, mx.array]:
    """Gemma's own twists on tinyvlm's random weights (tuned by greedy answers: varied, and steered by the image).

    Its RMSNorms scale by ``1 + weight``: identity is weight 0, except that the norms after each attention and
    MLP block scale by ``1 + POST_NORM`` (the embedding, multiplied by sqrt(hidden), would outweigh them and
    greedy decoding would copy its input token) and the q/k norms by ``1 + QK_NORM`` (sharper attention, so
    the answer is not the same for every context).  Its head is tied: mlx-vlm's gemma3 sanitize always replaces
    ``lm_head`` with the token embedding, so the table is small (EMBED_STD_TIED) and its special rows are shrunk
    in the embedding itself."""
    out = dict(weights)
    for name in out:
        if name.endswith("norm.weight") and not name.startswith("vision_tower."):
            out[name] = mx.zeros_like(out[name])
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                out[name] = out[name] + POST_NORM
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                out[name] = out[name] + QK_NORM
    embed = weights[EMBED] * (EMBED_STD_TIED / EMBED_STD)
    row_scale = mx.ones((embed.shape[0], 1))
    row_scale[mx.array(special_ids)] = SPECIAL_ROW_SCALE
    out[EMBED] = out[HEAD] = embed * row_scale
    return out
