"""Decoder embedding models (Qwen3-Embedding, gte-Qwen2, ...) on mlx_lm's own model classes.

A decoder embedder is a causal language model without its head: the vector is its final hidden state at the last
token (or a mean, if its sentence-transformers files say so). Rather than keep a module per family, we let mlx_lm
build the model from config.json, so every architecture mlx_lm runs (and its quantized variants) embeds, and call
its body (`model.model(ids)`, the stack and final norm without the LM head) for hidden states.

Two layouts differ from what `mlx_lm.utils.load_model` expects, and `_headless` adapts both:
- a sentence-transformers checkpoint is the bare base model (`Qwen3Model`): tensor names lack the `model.` prefix;
- its config may say `tie_word_embeddings: false` (Qwen3-Embedding-4B / 8B) with no `lm_head` tensor, because the
  head was never part of the embedding model. We never run the head, so it is not built at all (no memory spent).

Padding: batches are right-padded. Attention is causal, so a real token never sees the pads after it, and the
last real token of row i (index length_i - 1, which pooling picks) gets the vector it gets alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_server.models.embedinfo import EmbeddingInfo


def _headless(model_class: type[nn.Module]) -> type[nn.Module]:
    """`model_class` without its LM head, loading bare (`Qwen3Model`-style) checkpoints too."""

    class Headless(model_class):  # type: ignore[valid-type,misc]  # a subclass made per architecture
        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.pop("lm_head", None)  # an nn.Module is a dict of its children

        def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
            if "model" in self and not any(k.startswith("model.") for k in weights):
                weights = {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in weights.items()}
            parent = getattr(super(), "sanitize", None)
            if parent is not None:
                weights = parent(weights)
            return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}

    Headless.__name__ = Headless.__qualname__ = f"Headless{model_class.__name__}"
    return Headless


class DecoderEmbedder(nn.Module):
    """Token ids (batch, length), right-padded, and the real-token mask → final hidden states (batch, length, width).

    The mask is not needed by the model: causal attention already keeps the pads (always after the real tokens)
    out of every real token's view. Pooling uses it to skip the pads."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        return self.lm.model(ids)


def build(path: Path, cfg: dict[str, Any], info: EmbeddingInfo) -> tuple[nn.Module, int]:
    """Load the decoder in `path` (weights evaluated lazily by the caller) → (module, most tokens per input)."""
    # Deferred: importing mlx_lm pulls in transformers. `_get_classes` is load_model's own default class lookup.
    from mlx_lm.utils import _get_classes, load_model

    def classes(config: dict[str, Any]) -> tuple[type[nn.Module], type]:
        model_class, args_class = _get_classes(config)
        return _headless(model_class), args_class

    get_classes: Callable[[dict[str, Any]], tuple[type[nn.Module], type]] = classes
    lm, _ = load_model(path, lazy=True, strict=True, get_model_classes=get_classes)
    body = getattr(lm, "model", None)
    if body is None or not callable(body):
        raise ValueError(f"the {info.architecture} model has no `.model` body to take hidden states from")
    text = cfg.get("text_config", cfg)
    positions = int(text.get("max_position_embeddings") or cfg.get("max_position_embeddings") or info.max_length)
    return DecoderEmbedder(lm), positions


__all__ = ["DecoderEmbedder", "build"]
