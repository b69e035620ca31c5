"""A tiny random-weight LLaVA-NeXT (LLaVA 1.6) checkpoint that the real ``mlx_vlm.load`` accepts offline.

Same conventions as ``tinyvlm.py`` (whose helpers it uses): a locally trained tokenizer carrying ``<image>``,
llava-v1.6-mistral's chat template (``[INST] <image>\\ntext [/INST]``, BOS added by the tokenizer), float32
weights named like the mlx-vlm ``Model``'s parameters (``image_newline`` included), hidden 64, 2 layers.

The vision tower is CLIP on 32x32 tiles with 8 px patches (a 4x4 grid, CLS dropped by the "default" feature
select strategy).  ``image_grid_pinpoints`` [[32, 32], [32, 64], [64, 32]] keep the anyres grid small: the
processor picks the pinpoint that keeps most of the image, cuts it into 32x32 tiles after the base image (so
``pixel_values`` is (1, 1 + tiles, 3, 32, 32)), and expands ``<image>`` into the base tile's 16 features, the
tiles' features with the letterbox padding removed ("unpadding") and one newline feature per row:

* ``sample_image()`` (64x48) → pinpoint 32x64 (2 tiles, a 4x8 patch grid, unpadded to 4x6): 16 + 24 + 4 = 44;
* a 16x16 image → pinpoint 32x32 (1 tile, 4x4 grid, nothing to unpad): 16 + 16 + 4 = 36.
"""

from __future__ import annotations

from pathlib import Path

from support.tinyvlm import (
    _clip_processor,
    _clip_vision_config,
    _finish_lm,
    _llama_text_config,
    _llava_config,
    _start,
)

# llava-hf/llava-v1.6-mistral-7b-hf's template (plus plain-string content, which the server sends for turns
# without images): images of a user turn first as "<image>\n", then its text, in [INST] ... [/INST].
LLAVA_NEXT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{%- else -%}{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[INST] ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}"
    "{{ '<image>\\n' }}"
    "{%- endfor -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ content['text'] }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] + '</s> ' }}"
    "{%- else -%}{{ ' ' + message['content'][0]['text'] + '</s> ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

TILE = 32  # the tower's input size: the base image and every anyres tile
PATCH = 8
PINPOINTS = [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE]]


def build_llava_next(path: Path, *, seed: int = 0) -> Path:
    """LLaVA-NeXT style (model_type "llava_next"): CLIP vision tower on 32x32 tiles of 8 px patches, 2-layer MLP
    projector, a learned ``image_newline`` vector, mistral text model; LlavaNextImageProcessor with small
    ``image_grid_pinpoints``."""
    # The chat template writes no BOS: the tokenizer adds it, as in llava-hf.
    out_dir, added, vocab_size = _start(
        path,
        chat_template=LLAVA_NEXT_TEMPLATE,
        extra_special=("<image>",),
        eos_token="</s>",
        bos_token="<s>",
        prepend_bos="<s>",
    )
    text = _llama_text_config(
        vocab_size, model_type="mistral", rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=1000000.0
    )
    config = {
        **_llava_config(
            "llava_next", "LlavaNextForConditionalGeneration", added, vocab_size, image_grid_pinpoints=PINPOINTS
        ),
        "text_config": text,
        "vision_config": _clip_vision_config(TILE, PATCH),
    }
    _clip_processor(
        out_dir,
        "LlavaNextProcessor",
        TILE,
        PATCH,
        image_processor_type="LlavaNextImageProcessor",
        do_pad=True,
        image_grid_pinpoints=PINPOINTS,
    )
    return _finish_lm(out_dir, config, seed=seed, added=added)
