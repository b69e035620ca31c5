"""Mistral 3 (Mistral Small 3.1) and Pixtral: the image resized to whole cells of `patch_size × spatial_merge_size`
px (longest edge within the processor's size), one `[IMG]` per cell, `[IMG_BREAK]` after every row but the last,
`[IMG_END]` at the end — so the token count varies with the image's size and aspect (mlx-vlm's
Mistral3Processor / PixtralProcessor)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    # Its processor resizes to multiples of the merged patch, not of the image processor's own patch_size.
    cell = int(processor.patch_size) * int(getattr(processor, "spatial_merge_size", 1) or 1)
    out = processor.image_processor([image], patch_size=cell)  # mlx-vlm's numpy Pixtral image processor
    sizes = np.asarray(out["image_sizes"], dtype=np.int64).reshape(-1, 2)
    height, width = (int(x) for x in sizes[0])
    row = str(processor.image_token) * (width // cell)
    text = str(processor.image_break_token).join([row] * (height // cell)) + str(processor.image_end_token)
    return text, {"pixel_values": np.asarray(out["pixel_values"]), "image_sizes": sizes}


FAMILY = Family("mistral3", process)
