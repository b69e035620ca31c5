"""LLaVA-NeXT (LLaVA 1.6, Ollama's `llava:7b`): "anyres". The image processor picks the `image_grid_pinpoints`
resolution that keeps most of the image, letterboxes the image into it and cuts it into tower-sized tiles, after
a base tile of the whole image resized: `pixel_values` (1, 1 + rows × cols, 3, S, S) and the image's (height,
width). `<image>` becomes one token per feature the model packs: the base tile's patches, then the tiles' patch
grid with the letterbox rows (or columns) cut off again ("unpadding") and a newline feature after each of its
rows — so the count follows the image's size and aspect (mlx-vlm's LlavaNextProcessor, HF's
`pack_image_features`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


@dataclass(frozen=True)
class Layout:
    """Where one image's features come from: the tile grid and, on it, the patches kept after unpadding."""

    tiles: tuple[int, int]  # rows, columns of tiles (the chosen pinpoint ÷ the tile size)
    side: tuple[int, int]  # patches per tile: rows, columns
    keep: tuple[int, int, int, int]  # the unpadded patch grid: first row, rows, first column, columns

    @property
    def base(self) -> int:
        return self.side[0] * self.side[1]

    @property
    def packed(self) -> int:
        """The tiles' features after unpadding, a newline after each row."""
        _, rows, _, cols = self.keep
        return rows * (cols + 1)


def layout(size: tuple[int, int], pinpoints: Any, tile: tuple[int, int], patch: int) -> Layout:
    """The tile grid and unpadding for an image of `size` (height, width), as LlavaNextProcessor counts them."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = size
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    tiles = (int(best_h) // tile[0], int(best_w) // tile[1])
    side = (tile[0] // patch, tile[1] // patch)
    grid_h, grid_w = side[0] * tiles[0], side[1] * tiles[1]
    top, rows, left, cols = 0, grid_h, 0, grid_w
    if width / height > grid_w / grid_h:
        padding = (grid_h - int(round(height * (grid_w / width), 7))) // 2
        top, rows = padding, grid_h - 2 * padding
    else:
        padding = (grid_w - int(round(width * (grid_h / height), 7))) // 2
        left, cols = padding, grid_w - 2 * padding
    return Layout(tiles, side, (top, rows, left, cols))


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    # Not processor(...): it returns MLX arrays. Its image processor, called the way it calls it (do_pad pads
    # the tile axis across a batch; one image is no batch).
    ip = processor.image_processor
    out = ip([image], return_tensors="np")
    pixels = np.asarray(out["pixel_values"])
    sizes = np.asarray(out["image_sizes"], dtype=np.int64).reshape(-1, 2)
    height, width = (int(x) for x in sizes[0])
    tile = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    shape = layout((height, width), ip.image_grid_pinpoints, tile, int(processor.patch_size))
    n = shape.base + int(processor.num_additional_image_tokens or 0) + shape.packed
    if processor.vision_feature_select_strategy == "default":
        n -= 1  # the CLS token's feature is dropped
    grid = np.asarray([[*shape.tiles, *shape.keep]], dtype=np.int64)
    return str(processor.image_token) * n, {"pixel_values": pixels, "image_sizes": sizes, "image_layout": grid}


def image_features(vlm: Any, pixel_values: Any, arrays: Mapping[str, Any]) -> Any:
    """One image's features, a row per `<image>` token (inference thread, MLX): HF's `pack_image_features`.

    mlx-vlm's own LLaVA-NeXT `get_input_embeddings` (0.7.10, and upstream) ignores `image_sizes`: for each of the
    first 2 × (1 + tiles) `<image>` tokens it inserts a whole tile's features (then blocks of `image_newline`),
    so its sequence is longer than the processor's prompt and in no layout the model was trained on; it cannot
    be the encoder here."""
    import mlx.core as mx

    tiles_h, tiles_w, top, rows, left, cols = (int(x) for x in np.asarray(arrays["image_layout"]).reshape(-1)[:6])
    tiles = pixel_values[0]  # (1 + tiles, C, S, S): the base tile, then the grid's row by row
    *_, hidden = vlm.vision_tower(tiles.transpose(0, 2, 3, 1), output_hidden_states=True)
    selected = hidden[vlm.vision_feature_layer]
    if vlm.vision_feature_select_strategy != "default":  # HF packs tiles of exactly side × side patches: no CLS
        raise ValueError(f"unsupported vision_feature_select_strategy {vlm.vision_feature_select_strategy!r}")
    selected = selected[:, 1:]
    features = vlm.multi_modal_projector(selected)  # (1 + tiles, patches, D)
    dim = features.shape[-1]
    vision = vlm.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    grid = features[1 : 1 + tiles_h * tiles_w].reshape(tiles_h, tiles_w, side, side, dim)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(tiles_h * side, tiles_w * side, dim)
    grid = grid[top : top + rows, left : left + cols]
    newline = mx.broadcast_to(vlm.image_newline.astype(grid.dtype), (rows, 1, dim))
    packed = mx.concatenate([grid, newline], axis=1).reshape(rows * (cols + 1), dim)
    return mx.concatenate([features[0], packed], axis=0)


FAMILY = Family("llava_next", process, features=image_features)
