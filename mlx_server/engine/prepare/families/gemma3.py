"""Gemma 3: the chat template writes `<start_of_image>` for an image part, and Gemma3Processor replaces it with
`\\n\\n<start_of_image>` + `image_seq_length` × `<image_soft_token>` + `<end_of_image>\\n\\n` (one fixed-size
SigLIP crop, average-pooled to `mm_tokens_per_image` soft tokens). With pan-and-scan on (off in the released
configs) the image is also cut into crops: the marker becomes "Here is the original image <start_of_image> and
here are some crops to help you see better <start_of_image> …", each expanded the same way, and the crops' pixels
follow the original's (mlx-vlm's Gemma3Processor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    # transformers' Gemma 3 image processor, as Gemma3Processor calls it (its own pan-and-scan settings).
    out = processor.image_processor([image], return_tensors="np")
    pixels = np.asarray(out["pixel_values"])
    crops = int(np.asarray(out.get("num_crops", [0])).reshape(-1)[0])
    boi = str(processor.boi_token)
    text = boi
    if crops:
        text = f"Here is the original image {boi} and here are some crops to help you see better " + " ".join(
            [boi] * crops
        )
    text = text.replace(boi, str(processor.full_image_sequence))
    # Gemma 3's get_input_embeddings builds a 4D attention mask from `mask` and fails without one: the image's
    # tokens on their own (what its features are encoded from) are all attended.
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    return text, {"pixel_values": pixels, "mask": np.ones((1, len(ids)), dtype=np.int32)}


@dataclass(frozen=True)
class Gemma3Family(Family):
    def marker(self, processor: Any) -> str:
        """The template writes `<start_of_image>` (the processor's `boi_token`), not the soft image token."""
        return str(processor.boi_token)


FAMILY = Gemma3Family("gemma3", process)
