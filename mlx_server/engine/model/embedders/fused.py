"""Shared by the encoders whose attention has one fused input projection (nomic-bert's and ModernBERT's `Wqkv`)."""

from __future__ import annotations

import mlx.core as mx


def split_qkv(fused: mx.array, heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """(batch, length, 3 × width) laid out as (q | k | v), each heads × head_dim → q, k, v as (batch, heads, length,
    head_dim): the reference implementations' rearrange "... (three h d) -> three ... h d"."""
    batch, length, width3 = fused.shape
    qkv = fused.reshape(batch, length, 3, heads, width3 // (3 * heads)).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


__all__ = ["split_qkv"]
