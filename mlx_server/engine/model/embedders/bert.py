"""BERT and XLM-RoBERTa encoders in MLX, for embedding: all-MiniLM, bge-small/base/large, e5, bge-m3, multilingual-e5.

The module tree mirrors Hugging Face's `BertModel` with shorter names (see `sanitize`), so any BertModel /
XLMRobertaModel checkpoint — sentence-transformers' bare layout or a `bert.` / `roberta.`-prefixed one with heads
— loads strictly. Only the encoder runs: sentence-transformers pools the last hidden states, never the pooler.

XLM-R is BERT with two differences that matter here: positions count from `padding_idx + 1` (its 514 position
rows hold 512 tokens), and a single token type. Dropout is absent: inference only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_server.engine.model.embedders.activations import ACTIVATIONS as _ACTIVATIONS
from mlx_server.engine.model.embedders.names import encoder_tensors


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int  # 0 for BERT; padding_idx + 1 for XLM-R / RoBERTa

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], architecture: str) -> "BertConfig":
        act = str(cfg.get("hidden_act", "gelu"))
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}")
        if str(cfg.get("position_embedding_type", "absolute")) != "absolute":
            raise ValueError(f"unsupported position_embedding_type {cfg['position_embedding_type']!r}")
        pad = cfg.get("pad_token_id")
        offset = ((1 if pad is None else int(pad)) + 1) if architecture == "xlm-roberta" else 0
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2) or 1),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            position_offset=offset,
        )

    @property
    def max_tokens(self) -> int:
        """Longest input the position table can hold."""
        return self.max_position_embeddings - self.position_offset


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.offset = cfg.position_offset

    def __call__(self, ids: mx.array, types: Optional[mx.array] = None) -> mx.array:
        length = ids.shape[1]
        # Right padding: every real token sits at its own index, so positions need no mask. (HF gives XLM-R's pads
        # position padding_idx; pads are masked out of attention and pooling, so theirs never matters.)
        positions = mx.arange(self.offset, self.offset + length)
        # Sentence embeddings encode one segment: token type 0 everywhere, i.e. the first row of the table. A
        # cross-encoder's pair has two (`types`: 0 for the query, 1 for the document).
        segment = self.token_type_embeddings.weight[0] if types is None else self.token_type_embeddings(types)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + segment
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, width = x.shape
        head_dim = width // self.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # mask is boolean (batch, 1, 1, length): each query sees every real key of its row and no pad.
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(batch, length, width)
        return self.norm(x + self.out(o))  # post-norm residual, as BERT


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.ffn_norm(h + self.ffn_out(self.act(self.ffn_in(h))))


class BertModel(nn.Module):
    """Token ids (batch, length) and a boolean mask of real tokens → last hidden states (batch, length, width)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = [Layer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, ids: mx.array, mask: mx.array, types: Optional[mx.array] = None) -> mx.array:
        if ids.shape[1] > self.config.max_tokens:
            raise ValueError(f"{ids.shape[1]} tokens exceed the model's {self.config.max_tokens} positions")
        x = self.embeddings(ids, types)
        key_mask = mask[:, None, None, :].astype(mx.bool_)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


# HF name fragment → ours, applied in order ("attention.output." before the FFN's "output.").
_RENAMES: tuple[tuple[str, str], ...] = (
    ("encoder.layer.", "layers."),
    (".attention.self.", ".attention."),
    (".attention.output.dense.", ".attention.out."),
    (".attention.output.LayerNorm.", ".attention.norm."),
    (".intermediate.dense.", ".ffn_in."),
    (".output.dense.", ".ffn_out."),
    (".output.LayerNorm.", ".ffn_norm."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
)
_PREFIXES = ("bert.", "roberta.", "xlm_roberta.", "model.")
_DROPPED = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF / sentence-transformers tensor names → this module's; heads and buffers we do not run are dropped."""
    out: dict[str, mx.array] = {}
    for name, value in encoder_tensors(weights, _PREFIXES, _DROPPED, ("position_ids",)):
        if name.endswith(".gamma"):  # TF-converted checkpoints name LayerNorm parameters gamma / beta
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        for old, new in _RENAMES:
            name = name.replace(old, new)
        out[name] = value
    return out


__all__ = ["BertConfig", "BertModel", "sanitize"]
