"""Loading a checkpoint's safetensors into one of our modules, strictly: shared by embedders and rerankers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

Sanitize = Callable[[dict[str, mx.array]], dict[str, mx.array]]


def load_weights(module: nn.Module, path: Path, sanitize: Sanitize) -> nn.Module:
    """Every *.safetensors in `path`, renamed by `sanitize`, loaded strictly: a missing or extra tensor is an error."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))  # type: ignore[arg-type]  # safetensors load gives a dict
    module.load_weights(list(sanitize(weights).items()), strict=True)
    return module


__all__ = ["Sanitize", "load_weights"]
