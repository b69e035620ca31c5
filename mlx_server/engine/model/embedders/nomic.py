"""nomic-bert in MLX, for embedding: nomic-embed-text v1 / v1.5 (Ollama's `nomic-embed-text`), nomic-bert-2048.

Written from Nomic's own modeling code (`modeling_hf_nomic_bert.py`, the `trust_remote_code` module the hub
checkpoints name in their config) and the nomic-bert-2048 model card. It is BERT with four changes:

- no position table: rotary embeddings on q and k (GPT-NeoX layout — the two halves of a head, not interleaved
  pairs — unless `rotary_emb_interleaved`; `rotary_emb_fraction` of each head; base `rotary_emb_base`, 1000);
- a fused `Wqkv` projection laid out as (q | k | v), each (heads × head_dim);
- a gated MLP: `fc2(fc11(x) * act(fc12(x)))`, act = SiLU for "swiglu" (GELU for "geglu", sigmoid for "glu"), its
  width `n_inner` rounded up to a multiple of 256 as the reference does;
- no biases in the attention and MLP projections (per `qkv_proj_bias`, `mlp_fc1_bias`, `mlp_fc2_bias`).

Post-norm residuals and LayerNorms stay as in BERT. The module tree uses the checkpoint's own tensor names
(`emb_ln`, `encoder.layers.N.attn.Wqkv`, `mlp.fc11` ...), so loading needs no renaming.

Dynamic NTK rope scaling (`rotary_scaling_factor`) changes the rope base only for inputs longer than
`max_trained_positions`; we cap inputs there (embedinfo does too, as Ollama's 2048 context for nomic-embed-text), so
the plain rope is exact. Pre-norm, causal, xPos-scaled and mixture-of-experts variants (nomic-embed-text-v2-moe)
are refused rather than run wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_server.engine.model.embedders.fused import split_qkv
from mlx_server.engine.model.embedders.names import encoder_tensors

# activation_function → the gate's activation, as the reference's NomciBertGatedMLP applies it to fc12's output.
_GATES: dict[str, Callable[[mx.array], mx.array]] = {"swiglu": nn.silu, "geglu": nn.gelu, "glu": mx.sigmoid}


@dataclass(frozen=True)
class NomicConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    type_vocab_size: int
    eps: float
    rotary_dims: int
    rope_base: float
    rope_interleaved: bool
    qkv_bias: bool
    fc1_bias: bool
    fc2_bias: bool
    activation: str
    max_tokens: int

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "NomicConfig":
        act = str(cfg.get("activation_function", "swiglu"))
        if act not in _GATES:
            raise ValueError(f"unsupported nomic-bert activation_function {act!r} (gated MLPs only)")
        for key, why in (
            ("prenorm", "pre-norm blocks"),
            ("causal", "causal attention"),
            ("rotary_emb_scale_base", "xPos rotary scaling"),
            ("num_experts", "mixture of experts"),
            ("moe_every_n_layers", "mixture of experts"),
        ):
            if cfg.get(key):
                raise ValueError(f"nomic-bert with {why} ({key}={cfg[key]!r}) is not supported")
        if "n_embd" not in cfg:  # transformers' own NomicBertConfig (hidden_size, self_attn.q_proj, ...)
            raise ValueError(
                "nomic-bert checkpoints re-saved in transformers' native layout are not supported; "
                "use the hub layout (n_embd, attn.Wqkv)"
            )
        hidden = int(cfg["n_embd"])
        heads = int(cfg["n_head"])
        fraction = float(cfg.get("rotary_emb_fraction", 1.0) or 0.0)
        if fraction <= 0:
            raise ValueError("nomic-bert without rotary embeddings (rotary_emb_fraction 0) is not supported")
        # The reference rounds the gated MLP's width up to a multiple of 256 even when n_inner is given.
        inner = int(cfg.get("n_inner") or int(8 * hidden / 3))
        inner = (inner + 255) // 256 * 256
        positions = int(cfg.get("n_positions") or 0)
        if positions <= 0:  # as the reference's from_pretrained does for rotary models
            positions = 2048
        trained = int(cfg.get("max_trained_positions") or positions)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["n_layer"]),
            num_heads=heads,
            intermediate_size=inner,
            type_vocab_size=int(cfg.get("type_vocab_size", 2) or 0),
            eps=float(cfg.get("layer_norm_epsilon", 1e-12)),
            rotary_dims=int(hidden // heads * fraction),
            rope_base=float(cfg.get("rotary_emb_base", 10000.0)),
            rope_interleaved=bool(cfg.get("rotary_emb_interleaved", False)),
            qkv_bias=bool(cfg.get("qkv_proj_bias", True)),
            fc1_bias=bool(cfg.get("mlp_fc1_bias", True)),
            fc2_bias=bool(cfg.get("mlp_fc2_bias", True)),
            activation=act,
            max_tokens=min(positions, trained),
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: NomicConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)

    def __call__(self, ids: mx.array) -> mx.array:
        x = self.word_embeddings(ids)
        if "token_type_embeddings" in self:
            x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        return x


class Attention(nn.Module):
    def __init__(self, cfg: NomicConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.cfg = cfg
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = split_qkv(self.Wqkv(x), self.heads)
        # Right padding: real tokens sit at positions 0..n-1 of their row, so offset 0 is every row's own rope.
        c = self.cfg
        q = mx.fast.rope(q, c.rotary_dims, traditional=c.rope_interleaved, base=c.rope_base, scale=1.0, offset=0)
        k = mx.fast.rope(k, c.rotary_dims, traditional=c.rope_interleaved, base=c.rope_base, scale=1.0, offset=0)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(batch, length, width))


class GatedMLP(nn.Module):
    def __init__(self, cfg: NomicConfig) -> None:
        super().__init__()
        self.fc11 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.fc1_bias)
        self.fc12 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.fc1_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.fc2_bias)
        self.gate = _GATES[cfg.activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.fc11(x) * self.gate(self.fc12(x)))


class Block(nn.Module):
    def __init__(self, cfg: NomicConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = GatedMLP(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.norm1(x + self.attn(x, mask))  # post-norm, as BERT
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg: NomicConfig) -> None:
        super().__init__()
        self.layers = [Block(cfg) for _ in range(cfg.num_layers)]


class NomicBertModel(nn.Module):
    """Token ids (batch, length) and a boolean mask of real tokens → last hidden states (batch, length, width)."""

    def __init__(self, cfg: NomicConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.encoder = Encoder(cfg)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        if ids.shape[1] > self.config.max_tokens:
            raise ValueError(f"{ids.shape[1]} tokens exceed the model's {self.config.max_tokens} positions")
        x = self.emb_ln(self.embeddings(ids))
        key_mask = mask[:, None, None, :].astype(mx.bool_)
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return x


# A NomicBertForPreTraining checkpoint nests the encoder under "bert." beside its MLM head ("cls.").
_PREFIXES = ("bert.", "model.")
_DROPPED = ("cls.", "pooler.", "lm_head.", "classifier.")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint tensor names → this module's (the same, less a task model's prefix); heads are dropped."""
    return dict(encoder_tensors(weights, _PREFIXES, _DROPPED, ("position_ids", "inv_freq")))


__all__ = ["NomicBertModel", "NomicConfig", "sanitize"]
