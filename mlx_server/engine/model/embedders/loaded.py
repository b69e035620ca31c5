"""What an embedder and a reranker have in common once loaded: their model, tokenizer and what the files say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_server.engine.prepare.embed_tokenizer import EmbedTokenizer


class LoadedEncoder:
    def __init__(self, model: nn.Module, tokenizer: EmbedTokenizer, info: Any, path: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info  # EmbeddingInfo or RerankInfo: both know the model's width
        self.path = path

    @property
    def dimensions(self) -> int:
        return int(self.info.dimensions)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def nbytes(self) -> int:
        """Bytes of weights in memory: what the model adds to the memory budget."""
        leaves: list[tuple[str, Any]] = tree_flatten(self.model.parameters())  # type: ignore[assignment]  # stubs
        return sum(int(v.nbytes) for _, v in leaves)
