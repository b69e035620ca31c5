"""Tiny random-weight Mistral 3 (Mistral Small 3.1) and Pixtral checkpoints that the real ``mlx_vlm.load``
accepts offline.

Same conventions as ``tinyvlm.py`` (whose helpers they use): a locally trained tokenizer carrying the family's
tokens, the family's chat template, float32 weights named like the mlx-vlm ``Model``'s parameters, hidden 64,
2 layers.  The vision tower is Pixtral's (2D rope over patch rows and columns, block attention per image) on at
most 32 px images.  Mistral 3 takes 4 px patches and its projector merges 2x2 of them (``spatial_merge_size``);
Pixtral takes 8 px patches, unmerged.  Either way an image is resized to multiples of 8 px with its longest edge
at most 32 and makes one ``[IMG]`` per 8x8 px cell: ``[IMG]`` × columns per row, ``[IMG_BREAK]`` between rows,
``[IMG_END]`` at the end.  ``sample_image()`` (64x48) becomes 32x24: 3 rows of 4, 12 ``[IMG]`` tokens; a 16x16
image stays 16x16: 2 rows of 2, 4 tokens.
"""

from __future__ import annotations

from pathlib import Path

from support.tinyvlm import CLIP_MEAN, CLIP_STD, _finish_lm, _start, _write_processor

# Mistral Small 3.1's template (HF), without the dated default system prompt: BOS written by the template, a
# system prompt always, user turns in [INST] ... [/INST] with [IMG] where each image part goes, assistant turns
# ending in EOS.
MISTRAL3_TEMPLATE = (
    "{%- set default_system_message = 'You are a helpful assistant.' -%}"
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_message = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_message = messages[0]['content'][0]['text'] -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = default_system_message -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{- '[INST]' + message['content'] + '[/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST]' -}}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '[/INST]' -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{- message['content'] + eos_token -}}"
    "{%- else -%}{{- message['content'][0]['text'] + eos_token -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

MISTRAL3_SPECIAL = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)

IMAGE_SIZE = 32  # the tower's largest side (its 2D rope table) and the processor's longest edge
CELL = 8  # px per image token: patch_size × spatial_merge_size


def build_mistral3(path: Path, *, seed: int = 0) -> Path:
    """Mistral 3 style (model_type "mistral3"): Pixtral vision tower on 4 px patches, RMSNorm + 2x2 patch merger
    + 2-layer MLP projector, mistral text model (explicit head_dim, as in the real config)."""
    return _build(path, seed=seed, model_type="mistral3", patch_size=4, merge=2)


def build_pixtral(path: Path, *, seed: int = 0) -> Path:
    """Pixtral style (model_type "pixtral"): the same tower on 8 px patches, no merger (one ``[IMG]`` per patch),
    LLaVA-style 2-layer MLP projector with biases, mistral text model; the same processor logic as Mistral 3."""
    return _build(path, seed=seed, model_type="pixtral", patch_size=8, merge=1)


def _build(path: Path, *, seed: int, model_type: str, patch_size: int, merge: int) -> Path:
    assert patch_size * merge == CELL
    out_dir, added, vocab_size = _start(
        path, chat_template=MISTRAL3_TEMPLATE, extra_special=MISTRAL3_SPECIAL, eos_token="</s>", bos_token="<s>"
    )
    text = {
        "model_type": "mistral",
        "hidden_size": 64,
        "head_dim": 16,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    arch = {
        "mistral3": {
            "architectures": ["Mistral3ForConditionalGeneration"],
            "spatial_merge_size": merge,
            "multimodal_projector_bias": False,
        },
        "pixtral": {"architectures": ["LlavaForConditionalGeneration"]},
    }[model_type]
    config = {
        "model_type": model_type,
        **arch,
        "image_token_index": added["[IMG]"],
        "vision_feature_layer": -1,
        "projector_hidden_act": "gelu",
        "vocab_size": vocab_size,
        "bos_token_id": added["<s>"],
        "eos_token_id": added["</s>"],
        "pad_token_id": added["<|endoftext|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": 64,
            "head_dim": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": patch_size,
            "num_channels": 3,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
        },
    }
    _write_processor(
        out_dir,
        {
            "image_processor_type": "PixtralImageProcessor",
            "processor_class": "PixtralProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"longest_edge": IMAGE_SIZE},
            "patch_size": {"height": patch_size, "width": patch_size},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        },
        {
            "processor_class": "PixtralProcessor",
            "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]",
            "patch_size": patch_size,
            "spatial_merge_size": merge,
        },
    )
    return _finish_lm(out_dir, config, seed=seed, added=added)
