"""moondream2 (Ollama's `moondream`): one image, its 729 features right after BOS, a question-answer prompt, and a
language model that attends both ways over BOS and the image (a prefix-LM), causally after it.

mlx-vlm's Moondream2 processor builds `BOS + 729 placeholders + "\\n\\nQuestion: {q}\\n\\nAnswer: " + answer
marker` (its Moondream3 processor's layout) and crops the image into a global view plus overlapping tiles, in
numpy. Two things differ here, both on purpose:

- The tokenizer is the model dir's. mlx-vlm's Moondream2Processor always loads `moondream/starmie-v1` from the
  hub (the upstream checkpoint bundles a stale GPT-2 tokenizer); this server never downloads at load time, and it
  decodes with the dir's tokenizer anyway, so a checkpoint must ship the tokenizer it was trained with: one whose
  end-of-text id is not the config's is refused at load, with what to do.
- The prefix attends bidirectionally, as the model's own forward (`Model.__call__`'s 4-D mask) and upstream
  moondream do. mlx-vlm 0.7.10's generate computes that mask and then drops it (its language model reads only
  `mask`), so its answers come from a causal prefix.

A conversation is one prompt: the image after BOS, then per user turn the question block and the answer marker,
per assistant turn its text; a system prompt goes before the first question.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from mlx_server.engine.prepare.families import Family


def load(path: Path) -> Any:
    from mlx_vlm.models.moondream3.processing_moondream3 import Moondream3Processor

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if not any((path / name).exists() for name in tokenizer_files):
        # Moondream3Processor would fall back to the hub's starmie-v1: a download at load time.
        raise ValueError(f"{path} has no tokenizer: a moondream2 dir must ship its own (moondream/starmie-v1's)")
    processor = Moondream3Processor.from_pretrained(str(path))
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    if isinstance(eos, int) and processor.tokenizer.eos_token_id != eos:
        raise ValueError(
            f"{path}'s tokenizer ends text with id {processor.tokenizer.eos_token_id}, the model with {eos}: it is "
            "not the tokenizer the model was trained with (upstream moondream2 bundles GPT-2's; the model uses "
            "moondream/starmie-v1's): put that tokenizer's files in the model dir"
        )
    return processor


def _constants() -> tuple[int, int]:
    from mlx_vlm.models.moondream3 import processing_moondream3 as md

    return int(md.NUM_VISION_TOKENS), int(md.ANSWER_ID)


def process(processor: Any, image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    out = processor(images=[image])  # numpy crops: this processor makes no MLX arrays
    layout = out["crop_layouts"][0]
    return "", {
        "pixel_values": np.asarray(out["pixel_values"], dtype=np.float32),
        "num_crops": np.asarray(out["num_crops"], dtype=np.int64),
        "crop_layout": np.asarray(layout if layout is not None else (0, 0), dtype=np.int64),
    }


def build(
    processor: Any, turns: Sequence[tuple[str, str]], raw: Optional[str], images: int
) -> tuple[list[int], list[tuple[int, ...]]]:
    """The prompt's tokens and each image's positions (one image at most; it always follows BOS)."""
    if images > 1:
        raise ValueError("moondream2 takes one image per request")
    vision_tokens, answer = _constants()
    tok = processor.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    tokens = [int(bos)]
    slots: list[tuple[int, ...]] = []
    if images:
        slots.append(tuple(range(1, 1 + vision_tokens)))
        tokens += [0] * vision_tokens  # placeholders, as mlx-vlm's: their embeddings are replaced

    def text(s: str) -> list[int]:
        return list(tok.encode(s, add_special_tokens=False))

    if raw is not None:
        return tokens + text(raw), slots
    for role, content in turns:
        if role == "user":
            tokens += text(f"\n\nQuestion: {content}\n\nAnswer: ") + [answer]
        elif content:
            tokens += text(content)
    return tokens, slots


def image_features(vlm: Any, pixel_values: Any, arrays: Mapping[str, Any]) -> Any:
    """The image's 729 projected features (inference thread, MLX): the global crop's, beside its tiles' stitched
    and pooled back to the same grid."""
    crops = int(np.asarray(arrays["num_crops"]).reshape(-1)[0])
    rows, cols = (int(x) for x in np.asarray(arrays["crop_layout"]).reshape(-1)[:2])
    layout = [(rows, cols)] if rows and cols else None
    return vlm.vision(pixel_values, num_crops=[crops], crop_layouts=layout)[0]


FAMILY = Family(
    "moondream2",
    process,
    features=image_features,
    load=load,
    build=build,
    image_token_id=0,
    prefix=True,
    quantized_kv=False,  # its attention calls MLX's fused kernel itself, which takes no quantized cache
)
