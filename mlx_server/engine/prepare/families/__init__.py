"""Vision families: how each family's processor turns one image into numpy inputs and the text of its image
tokens (and, for mRoPE families, every token's rope position). One module per family; a new family is a module
and its line in FAMILIES. Runs in the preparation stage: no MLX arrays (mlx-vlm's processors make MLX arrays, so
each family calls its image processor directly, as its mlx-vlm processor would, for numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

Process = Callable[[Any, Image.Image], tuple[str, dict[str, np.ndarray]]]
# (processor, prompt tokens, each image's (first position, its arrays)) → positions (3, L), rope delta
Positions = Callable[[Any, Sequence[int], Sequence[tuple[int, dict[str, np.ndarray]]]], tuple[np.ndarray, int]]

Features = Callable[[Any, Any, Mapping[str, Any]], Any]
# (processor, the conversation's (role, text) turns, a raw prompt or None, how many images) → the prompt's tokens
# and each image's positions: a family whose prompt is not its chat template's text (moondream2)
Build = Callable[[Any, Sequence[tuple[str, str]], Optional[str], int], tuple[list[int], list[tuple[int, ...]]]]


@dataclass(frozen=True)
class Family:
    name: str
    process: Process  # one image → its expansion text (the marker's replacement) and its numpy inputs
    positions: Optional[Positions] = None  # mRoPE families: every token's (t, h, w) rope position
    # Inference thread (MLX): (vlm, pixel_values, other arrays) → the image's features, a row per image token, for
    # a family whose mlx-vlm get_input_embeddings misplaces them (LLaVA-NeXT); None: taken from get_input_embeddings.
    features: Optional[Features] = None
    load: Optional[Callable[[Path], Any]] = None  # the family's processor, where mlx-vlm's would reach the hub
    build: Optional[Build] = None
    image_token_id: Optional[int] = None  # the placeholder's id, where neither config nor processor names one
    prefix: bool = False  # BOS and the image attend to each other both ways (a prefix-LM), causal after them
    quantized_kv: bool = True  # its language model's attention takes a quantized cache (kv_cache q8 / q4)

    def marker(self, processor: Any) -> str:
        """What the chat template writes for one image part."""
        return str(processor.image_token)


def _families() -> dict[str, Family]:
    from mlx_server.engine.prepare.families import (
        gemma3,
        idefics3,
        llava,
        llava_next,
        mistral3,
        moondream2,
        qwen3_vl,
        qwen_vl,
    )

    return {
        "llava": llava.FAMILY,
        "llava_next": llava_next.FAMILY,
        "qwen2_vl": qwen_vl.FAMILY,
        "qwen2_5_vl": qwen_vl.FAMILY,
        "qwen3_vl": qwen3_vl.FAMILY,
        "idefics3": idefics3.FAMILY,
        "smolvlm": idefics3.FAMILY,
        "mistral3": mistral3.FAMILY,
        "pixtral": mistral3.FAMILY,
        "gemma3": gemma3.FAMILY,
        "moondream2": moondream2.FAMILY,
    }


FAMILIES: dict[str, Family] = _families()

__all__ = ["FAMILIES", "Build", "Family", "Features", "Positions", "Process"]
