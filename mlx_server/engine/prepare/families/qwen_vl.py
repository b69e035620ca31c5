"""Qwen2-VL / Qwen2.5-VL: patches on a grid (t, h, w), one `<|image_pad|>` per merged patch, and multimodal rope
positions (mRoPE) in three dimensions."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    ip = processor.image_processor
    out = ip([image])  # its own (mlx-vlm's) image processor: numpy already
    grid = np.asarray(out["image_grid_thw"])
    n = int(grid[0].prod()) // int(ip.merge_size) ** 2
    return str(processor.image_token) * n, {"pixel_values": np.asarray(out["pixel_values"]), "image_grid_thw": grid}


def positions(
    processor: Any, tokens: Sequence[int], images: Sequence[tuple[int, dict[str, np.ndarray]]]
) -> tuple[np.ndarray, int]:
    """Every token's (temporal, height, width) rope position, as Qwen2-VL's get_rope_index computes them: text
    counts on from the previous maximum, an image's tokens take its merged grid coordinates."""
    merge = int(processor.image_processor.merge_size)
    parts: list[np.ndarray] = []
    start = 0
    next_pos = 0
    for first, arrays in images:
        text = first - start
        parts.append(np.broadcast_to(np.arange(text) + next_pos, (3, text)))
        t, h, w = (int(x) for x in arrays["image_grid_thw"][0])
        gt, gh, gw = t, h // merge, w // merge
        grid = np.stack(
            [
                np.repeat(np.arange(gt), gh * gw),
                np.tile(np.repeat(np.arange(gh), gw), gt),
                np.tile(np.arange(gw), gt * gh),
            ]
        )
        parts.append(grid + next_pos + text)
        next_pos = int(parts[-1].max()) + 1
        start = first + gt * gh * gw
    rest = len(tokens) - start
    parts.append(np.broadcast_to(np.arange(rest) + next_pos, (3, rest)))
    out = np.concatenate(parts, axis=1).astype(np.int32)
    return out, int(out.max()) + 1 - len(tokens)


FAMILY = Family("qwen_vl", process, positions)
