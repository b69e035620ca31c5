"""LLaVA 1.5: one fixed-size crop, `<image>` repeated once per vision patch kept by the feature select strategy."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    # Not processor(...): mlx-vlm 0.7.10's LlavaProcessor passes padding=True to transformers' CLIP image
    # processor, which rejects it, and it returns MLX arrays.
    out = processor.image_processor([image], return_tensors="np")
    pixels = np.asarray(out["pixel_values"])
    h, w = pixels.shape[-2:]
    n = (h // processor.patch_size) * (w // processor.patch_size) + int(processor.num_additional_image_tokens)
    if processor.vision_feature_select_strategy == "default":
        n -= 1  # the CLS token's feature is dropped
    return str(processor.image_token) * n, {"pixel_values": pixels}


FAMILY = Family("llava", process)
