"""Idefics3 / SmolVLM: the image split into rows × columns of tiles plus a global view, each `image_seq_len`
`<image>` tokens between the family's markers (mlx-vlm's own prompt string)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    from mlx_vlm.models.idefics3.processing_idefics3 import get_image_prompt_string

    out = processor.image_processor([[image]], return_row_col_info=True, return_tensors="np")
    text = get_image_prompt_string(
        out["rows"][0][0],
        out["cols"][0][0],
        processor.image_seq_len,
        image_token=processor.image_token,
        fake_token_around_image=processor.fake_image_token,
        global_img_token=processor.global_image_tag,
    )
    arrays = {"pixel_values": np.asarray(out["pixel_values"])}
    if "pixel_attention_mask" in out:
        arrays["pixel_attention_mask"] = np.asarray(out["pixel_attention_mask"])
    return text, arrays


FAMILY = Family("idefics3", process)
