"""Embedding models in MLX: load a model dir, embed padded batches of token ids, pool, normalize.

`load_embedder(path)` reads what the files say (mlx_server.models.embedinfo: architecture, pooling, max length),
builds the architecture's module, loads its safetensors strictly and pairs it with an `EmbedTokenizer`. One module
per encoder architecture, registered in `_BUILDERS`: bert.py (BERT and XLM-RoBERTa), nomic.py (nomic-bert),
modernbert.py. Decoders (Qwen3-Embedding and the like) run on mlx_lm's own model classes (decoder.py), so any
architecture mlx_lm knows can embed. Rerankers (rerankers.py: cross-encoders on these encoders, decoder rerankers)
are loaded here too, as the encoder-family models they are, and come back as a `Reranker`.

Only the inference thread may call `Embedder.embed` (it runs MLX); `Embedder.tokenizer` is plain Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_server.engine.model.embedders import bert, decoder, modernbert, nomic, rerankers
from mlx_server.engine.model.embedders.loaded import LoadedEncoder
from mlx_server.engine.model.embedders.rerankers import Reranker
from mlx_server.engine.model.embedders.weights import load_weights as _load_weights
from mlx_server.engine.prepare.embed_tokenizer import EmbedTokenizer
from mlx_server.models.embedinfo import DECODER_TYPES, ENCODER_TYPES, EmbeddingInfo, Pooling, embedding_info
from mlx_server.models.rerankinfo import rerank_info

# torch.nn.functional.normalize's default eps, which sentence-transformers' Normalize uses.
_NORM_EPS = 1e-12


# model dir, its config.json, what embedinfo says → (the module with its weights loaded, most tokens per input)
Builder = Callable[[Path, dict[str, Any], EmbeddingInfo], tuple[nn.Module, int]]


def _build_bert(path: Path, cfg: dict[str, Any], info: EmbeddingInfo) -> tuple[nn.Module, int]:
    bert_cfg = bert.BertConfig.from_dict(cfg, info.architecture)
    return _load_weights(bert.BertModel(bert_cfg), path, bert.sanitize), bert_cfg.max_tokens


def _build_nomic(path: Path, cfg: dict[str, Any], info: EmbeddingInfo) -> tuple[nn.Module, int]:
    nomic_cfg = nomic.NomicConfig.from_dict(cfg)
    return _load_weights(nomic.NomicBertModel(nomic_cfg), path, nomic.sanitize), nomic_cfg.max_tokens


def _build_modernbert(path: Path, cfg: dict[str, Any], info: EmbeddingInfo) -> tuple[nn.Module, int]:
    mb_cfg = modernbert.ModernBertConfig.from_dict(cfg)
    return _load_weights(modernbert.ModernBertModel(mb_cfg), path, modernbert.sanitize), mb_cfg.max_tokens


_BUILDERS: dict[str, Builder] = {
    "bert": _build_bert,
    "xlm-roberta": _build_bert,
    "nomic_bert": _build_nomic,
    "modernbert": _build_modernbert,
    **{model_type: decoder.build for model_type in sorted(DECODER_TYPES)},
}


def _builder(architecture: str) -> Builder:
    """The builder for `architecture`; one not listed that is no encoder is tried as an mlx_lm decoder (models.yaml
    `kind: embedding` on, say, a phi3 checkpoint), which fails with mlx_lm's own "not supported" if it is none."""
    if architecture in _BUILDERS:
        return _BUILDERS[architecture]
    if architecture in ENCODER_TYPES.values() or architecture == "unknown":
        raise ValueError(
            f"no MLX embedder for architecture {architecture!r} (supported: "
            f"{', '.join(sorted(_BUILDERS))}, and other mlx_lm decoders)"
        )
    return decoder.build


def pool(hidden: mx.array, mask: mx.array, how: Pooling) -> mx.array:
    """(batch, length, width) hidden states → (batch, width) float32, looking only at real tokens (mask True).

    Pads are never pooled: a padded batch gives each row the vector it gets alone.
    """
    hidden = hidden.astype(mx.float32)
    real = mask.astype(mx.float32)[..., None]
    lengths = mask.astype(mx.int32).sum(axis=1)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        # Right padding: the last real token of row i is at lengths[i] - 1.
        return mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if how == "max":
        return mx.where(mask[..., None], hidden, mx.array(-mx.inf, mx.float32)).max(axis=1)
    total = (hidden * real).sum(axis=1)
    count = mx.maximum(real.sum(axis=1), 1e-9)  # sentence-transformers clamps the count the same way
    if how == "mean":
        return total / count
    if how == "mean_sqrt_len":
        return total / mx.sqrt(count)
    raise ValueError(f"unknown pooling {how!r}")


def l2_normalize(vectors: mx.array) -> mx.array:
    norms = mx.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / mx.maximum(norms, _NORM_EPS)


class Embedder(LoadedEncoder):
    """One loaded embedding model."""

    info: EmbeddingInfo

    def embed(self, batch: Sequence[Sequence[int]], *, normalize: bool = True) -> mx.array:
        """Token-id lists (any lengths up to max_length) → evaluated float32 (len(batch), dimensions).

        The batch is right-padded to its longest row with an attention mask; callers that want less padding
        bucket by length before calling. Vectors are L2-normalized unless normalize=False.
        """
        if not batch:
            return mx.zeros((0, self.dimensions), dtype=mx.float32)
        lengths = [len(row) for row in batch]
        if min(lengths) == 0:
            raise ValueError("cannot embed an empty token list")
        if max(lengths) > self.max_length:
            raise ValueError(f"an input of {max(lengths)} tokens exceeds the model's {self.max_length}")
        width = max(lengths)
        # Pad id 0 is as good as any: pads are masked out of attention and of pooling.
        ids = mx.array([list(row) + [0] * (width - len(row)) for row in batch], dtype=mx.int32)
        mask = mx.arange(width)[None, :] < mx.array(lengths)[:, None]
        vectors = pool(self.model(ids, mask), mask, self.info.pooling)
        if normalize:
            vectors = l2_normalize(vectors)
        mx.eval(vectors)
        return vectors


def load_embedder(
    path: Path, *, kind: Optional[str] = None, dtype: Optional[mx.Dtype] = None
) -> Union[Embedder, Reranker]:
    """Load the embedding model in `path` (config.json, *.safetensors, tokenizer.json, optional sentence-transformers
    files). `kind` is models.yaml's explicit kind (see embedding_info); `dtype` casts floating weights (default: as
    stored). Raises ValueError for a model this server cannot embed with.

    A reranker (models.rerankinfo) is one of these encoder-family models too, loaded the same way in one go: for
    it this returns its `Reranker`, which scores pairs and embeds nothing."""
    path = Path(path)
    rerank = rerank_info(path, kind)
    if rerank is not None:
        return rerankers.load_reranker(path, rerank, dtype)
    info = embedding_info(path, kind)
    if not info.is_embedding:
        raise ValueError(f"{path} is not an embedding model")
    if info.unsupported:
        raise ValueError(f"{path} needs sentence-transformers modules we do not run: {', '.join(info.unsupported)}")
    cfg = json.loads((path / "config.json").read_text())
    model, positions = _builder(info.architecture)(path, cfg, info)
    if dtype is not None:
        model.set_dtype(dtype)  # floating parameters only: quantized weights and integer buffers stay as they are
    model.eval()
    mx.eval(model.parameters())
    tokenizer = EmbedTokenizer.from_dir(path, min(info.max_length, positions))
    return Embedder(model, tokenizer, info, path)


__all__ = ["EmbedTokenizer", "Embedder", "Reranker", "l2_normalize", "load_embedder", "pool"]
