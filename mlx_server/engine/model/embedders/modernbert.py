"""ModernBERT in MLX, for embedding: modernbert-embed, gte-modernbert and other ModernBertModel checkpoints.

Written from Hugging Face's `modeling_modernbert.py` (transformers 5) and the ModernBERT paper. Against BERT:
- pre-norm residual blocks (the first layer's attention norm is the identity, so that checkpoint has none), a final
  LayerNorm, and no biases in any projection or norm (per `attention_bias`, `mlp_bias`, `norm_bias`);
- no position table: rotary embeddings (GPT-NeoX halves layout) whose base depends on the layer's attention kind;
- alternating attention: every `global_attn_every_n_layers`-th layer (0, 3, 6, ...) attends globally with base
  `global_rope_theta` (160,000); the others see only keys within `local_attention // 2` positions either side
  (|i - j| ≤ 64 for a 128 window) with base `local_rope_theta` (10,000);
- a GeGLU MLP: `Wi` makes 2 × intermediate features, split into (input, gate); out = `Wo(act(input) * gate)`;
- a fused `Wqkv` laid out as (q | k | v).
Configs written by transformers ≥ 5 say the same with `layer_types` and `rope_parameters`; both forms are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_server.engine.model.embedders.activations import ACTIVATIONS as _ACTIVATIONS
from mlx_server.engine.model.embedders.fused import split_qkv
from mlx_server.engine.model.embedders.names import encoder_tensors


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    activation: str
    global_theta: float
    local_theta: float
    window: int  # a local layer's query sees keys at most this many positions away
    global_layers: tuple[bool, ...]  # per layer: global attention?
    max_tokens: int

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModernBertConfig":
        act = str(cfg.get("hidden_activation", "gelu"))
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported ModernBERT hidden_activation {act!r}")
        layers = int(cfg["num_hidden_layers"])
        every = int(cfg.get("global_attn_every_n_layers", 3) or 1)
        types = cfg.get("layer_types") or [
            "full_attention" if i % every == 0 else "sliding_attention" for i in range(layers)
        ]
        if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"unsupported ModernBERT layer_types {types!r}")
        rope = cfg.get("rope_parameters") or {}
        for kind in ("full_attention", "sliding_attention"):
            rope_type = (rope.get(kind) or {}).get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"unsupported ModernBERT rope_type {rope_type!r} for {kind}")
        global_theta = float(
            (rope.get("full_attention") or {}).get("rope_theta") or cfg.get("global_rope_theta") or 160_000.0
        )
        # The original code falls back to the global base when local_rope_theta is null.
        local_theta = float(
            (rope.get("sliding_attention") or {}).get("rope_theta") or cfg.get("local_rope_theta") or global_theta
        )
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            eps=float(cfg.get("norm_eps", 1e-5)),
            norm_bias=bool(cfg.get("norm_bias", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            activation=act,
            global_theta=global_theta,
            local_theta=local_theta,
            window=int(cfg.get("local_attention", 128)) // 2,
            global_layers=tuple(t == "full_attention" for t in types),
            max_tokens=int(cfg.get("max_position_embeddings", 8192)),
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, bias=cfg.norm_bias)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.norm(self.tok_embeddings(ids))


class Attention(nn.Module):
    def __init__(self, cfg: ModernBertConfig, theta: float) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.theta = theta
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = split_qkv(self.Wqkv(x), self.heads)
        # Right padding: every real token sits at its own index, so offset 0 is each row's own positions.
        q = mx.fast.rope(q, head_dim, traditional=False, base=self.theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, head_dim, traditional=False, base=self.theta, scale=1.0, offset=0)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask=mask)
        return self.Wo(o.transpose(0, 2, 1, 3).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = _ACTIVATIONS[cfg.activation]

    def __call__(self, x: mx.array) -> mx.array:
        inputs, gate = mx.split(self.Wi(x), 2, axis=-1)
        return self.Wo(self.act(inputs) * gate)


class Layer(nn.Module):
    def __init__(self, cfg: ModernBertConfig, index: int) -> None:
        super().__init__()
        self.is_global = cfg.global_layers[index]
        if index > 0:  # layer 0's attention norm is the identity: the embeddings were just normalized
            self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, bias=cfg.norm_bias)
        self.attn = Attention(cfg, cfg.global_theta if self.is_global else cfg.local_theta)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, bias=cfg.norm_bias)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array, global_mask: mx.array, local_mask: mx.array) -> mx.array:
        h = self.attn_norm(x) if "attn_norm" in self else x
        x = x + self.attn(h, global_mask if self.is_global else local_mask)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nn.Module):
    """Token ids (batch, length) and a boolean mask of real tokens → last hidden states (batch, length, width)."""

    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = [Layer(cfg, i) for i in range(len(cfg.global_layers))]
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, bias=cfg.norm_bias)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        length = ids.shape[1]
        if length > self.config.max_tokens:
            raise ValueError(f"{length} tokens exceed the model's {self.config.max_tokens} positions")
        x = self.embeddings(ids)
        global_mask = mask[:, None, None, :].astype(mx.bool_)  # every real key of the row, no pad
        pos = mx.arange(length)
        near = mx.abs(pos[:, None] - pos[None, :]) <= self.config.window
        # (batch, 1, length, length). A pad query far past its row's text would see no key at all, and a softmax
        # over nothing is NaN, which 0-weighted attention would still carry into real rows: pads see themselves.
        local_mask = mx.logical_or(mx.logical_and(global_mask, near[None, None]), mx.eye(length, dtype=mx.bool_))
        for layer in self.layers:
            x = layer(x, global_mask, local_mask)
        return self.final_norm(x)


_PREFIXES = ("model.",)  # ModernBertForMaskedLM and friends nest the encoder under "model."
_DROPPED = ("head.", "decoder.", "classifier.", "lm_head.")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint tensor names → this module's (the same, less a task model's prefix); heads are dropped."""
    return dict(encoder_tensors(weights, _PREFIXES, _DROPPED, ("inv_freq",)))


__all__ = ["ModernBertConfig", "ModernBertModel", "sanitize"]
