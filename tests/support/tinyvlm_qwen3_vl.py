"""A tiny random-weight Qwen3-VL checkpoint that the real ``mlx_vlm.load`` accepts offline.

Same conventions as ``tinyvlm.py`` (whose helpers it uses, and whose ``build_qwen2_vl`` it follows): a locally
trained tokenizer carrying the Qwen-VL vision tokens, Qwen3-VL's chat template, float32 weights named like the
mlx-vlm ``Model``'s parameters, hidden 64, 2 text layers.

What Qwen3-VL adds over Qwen2-VL, in miniature:

* the text model is qwen3's (q/k RMS norms, explicit ``head_dim``) with *interleaved* mRoPE: of the 8 rotary
  frequencies (head_dim 16), the height and width sections take every third one from 1 and 2 (``mrope_section``
  [4, 2, 2], like the real [24, 20, 20] of 64);
* the vision tower adds learned position embeddings (``num_position_embeddings`` 64, an 8x8 table interpolated
  to each image's patch grid) to the 3D patch embeddings;
* **deepstack**: the outputs of vision blocks ``DEEPSTACK_INDEXES`` each go through a merger of their own, and
  the text model adds them to its hidden states at the image positions after its first decoder layers (one
  merger per layer, here both text layers).

Patches are 8 px and merged 2x2, so the resize factor is 16 and the pixel budget [1024, 4096] gives 4..16 image
tokens; ``sample_image()`` (64x48) stays 64x48: grid_thw [1, 6, 8], 48 patches, 12 ``<|image_pad|>`` tokens.
"""

from __future__ import annotations

from pathlib import Path

from support.tinyvlm import QWEN2_VL_SPECIAL, _finish_lm, _qwen_vl_processor, _qwen_vl_token_ids, _start

# Qwen/Qwen3-VL-*-Instruct's template, without tools: no default system turn (unlike Qwen2-VL's), ChatML turns,
# each image part <|vision_start|><|image_pad|><|vision_end|> in place (the processor repeats <|image_pad|>).
QWEN3_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
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
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
DEEPSTACK_INDEXES = [0, 1]  # vision blocks whose outputs feed text layers 0 and 1
SAMPLE_IMAGE_TOKENS = 12  # sample_image() (64x48): 6x8 patches, merged 2x2
# Qwen3-VL's processor normalises with mean = std = 0.5 (preprocessor_config.json of the released models).
HALF = [0.5, 0.5, 0.5]


def build_qwen3_vl(path: Path, *, seed: int = 0) -> Path:
    """Qwen3-VL style (model_type "qwen3_vl"): see the module docstring."""
    min_pixels = (PATCH_SIZE * MERGE_SIZE) ** 2 * 4
    max_pixels = (PATCH_SIZE * MERGE_SIZE) ** 2 * 16
    out_dir, added, vocab_size = _start(path, chat_template=QWEN3_VL_TEMPLATE, extra_special=QWEN2_VL_SPECIAL)
    text = {
        "model_type": "qwen3_vl_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 5000000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    config = {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        **_qwen_vl_token_ids(added),
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": PATCH_SIZE,
            "spatial_patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": DEEPSTACK_INDEXES,
        },
    }
    image_settings = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": HALF,
        "image_std": HALF,
        "do_convert_rgb": True,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }
    _qwen_vl_processor(
        out_dir,
        "Qwen3VLProcessor",
        image_settings,
        image_type="Qwen2VLImageProcessorFast",
        video_type="Qwen3VLVideoProcessor",
        fps=2,
    )
    return _finish_lm(out_dir, config, seed=seed, added=added)


__all__ = ["DEEPSTACK_INDEXES", "QWEN3_VL_TEMPLATE", "SAMPLE_IMAGE_TOKENS", "build_qwen3_vl"]
