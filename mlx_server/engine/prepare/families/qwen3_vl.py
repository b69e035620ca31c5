"""Qwen3-VL: for images, Qwen2-VL's expansion and positions unchanged.

Its numpy image processor (mlx-vlm's Qwen3VLImageProcessor) returns `pixel_values` and `image_grid_thw` like
Qwen2-VL's, one `<|image_pad|>` per merged patch; its `get_rope_index` numbers an image's tokens by their merged
grid coordinates after the text before it, as Qwen2-VL's does (only videos differ: one timestamped block per
temporal patch group, which this server does not take). What is new to Qwen3-VL happens on the inference thread:
interleaved mRoPE inside the model, and deepstack features (`deepstack_visual_embeds`, one per early decoder
layer) that model/vision.py keeps per image beside its main features and passes with each chunk's image rows.
"""

from __future__ import annotations

from mlx_server.engine.prepare.families import Family, qwen_vl

FAMILY = Family("qwen3_vl", qwen_vl.process, qwen_vl.positions)
