"""ggml block quants → MLX affine quantization (groups of 32), in numpy, a slice of rows at a time.

MLX's affine format stores, per group of 32 weights along a row, integer codes q in [0, 2^bits) packed little-endian
into uint32 words, plus a float scale s and bias b: w = s * q + b. Most ggml blocks are exactly that:

    Q4_0 / Q5_0 / Q8_0   w = d * (q - 8 | 16 | 128)     → s = d,         b = -(8 | 16 | 128) * d
    Q4_1 / Q5_1          w = d * q + m                   → s = d,         b = m
    Q4_K / Q5_K          w = (d * sc_j) * q - dmin * m_j → s = d * sc_j,  b = -(dmin * m_j)   (32-weight sub-block j)

With float32 scales and biases every product above is exact (an f16 times an integer of at most 8 bits), so MLX's
dequantize and gguf-py's agree bit for bit in float32 — the tests check that per type. Q6_K, Q3_K and Q2_K scale
16-weight halves of a group separately, which one MLX group cannot hold: they are dequantized with gguf-py and
requantized by MLX (`mx.quantize`), and the error that adds is measured and reported. The format descriptions follow
ggml-common.h / ggml-quants.c (dequantize_row_*); this module does not share code with gguf-py's decoders, so the
check against gguf-py is independent.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from mlx_server.models.gguf_file import LOSSLESS_BITS, REQUANT_BITS

GROUP = 32  # every MLX group we write holds 32 weights: the sub-block size of all lossless ggml types

if sys.byteorder != "little":  # the packing below builds little-endian words from bytes
    raise ImportError("GGUF import needs a little-endian host")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Bytes (n, k*run) → 4-bit codes (n, k, 2*run): each run of bytes gives its low nibbles, then its high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, run)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins → (scales, mins), each (n, 8) float32."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)], axis=1)
    mn = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _high_bits(qh: np.ndarray, groups: int) -> np.ndarray:
    """Q5_K's qh (n, 32) bytes: bit j of byte l is the 5th bit of weight l in sub-block j → (n, groups, 32)."""
    shifts = np.arange(groups, dtype=np.uint8)[None, :, None]
    return (qh[:, None, :] >> shifts) & 1


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18], 16).reshape(-1, 32), d, -8 * d


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 4:20], 16).reshape(-1, 32), _f16(b, 0), _f16(b, 2)


def _q5_bits(qh: np.ndarray) -> np.ndarray:
    # Q5_0/Q5_1: a little-endian uint32 whose bit j is the 5th bit of weight j.
    word = np.ascontiguousarray(qh).view(np.uint32)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    q = _nibbles(b[:, 6:22], 16).reshape(-1, 32) | (_q5_bits(b[:, 2:6]) << 4)
    return q, d, -16 * d


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _nibbles(b[:, 8:24], 16).reshape(-1, 32) | (_q5_bits(b[:, 4:8]) << 4)
    return q, _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    q = (np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:144], 32).reshape(-1, 8, 32)  # 4 runs of 32 bytes → sub-blocks 2j (low), 2j+1 (high)
    return q.reshape(-1, 256), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 48:176], 32).reshape(-1, 8, 32) | (_high_bits(b[:, 16:48], 8) << 4)
    return q.reshape(-1, 256), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


# type name → (weights per block, bytes per block, decoder to (codes, scale per 32, bias per 32))
_DECODERS: dict[str, tuple[int, int, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]]] = {
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
}
assert set(_DECODERS) == set(LOSSLESS_BITS)


def affine_codes(data: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ggml blocks (rows, bytes per row) → codes (rows, cols) uint8, scales and biases (rows, cols/32)."""
    per_block, size, decode = _DECODERS[type_name]
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    q, scales, biases = decode(blocks)
    cols = blocks.shape[0] * per_block // rows
    return q.reshape(rows, cols), scales.reshape(rows, cols // GROUP), biases.reshape(rows, cols // GROUP)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, cols) < 2^bits → MLX's packed uint32 (rows, cols*bits/32): a little-endian bit stream per row."""
    rows, cols = q.shape
    if bits == 8:  # one code per byte: the bytes already are the stream
        return np.ascontiguousarray(q, dtype=np.uint8).view(np.uint32)
    if bits == 4:  # two codes per byte, low nibble first
        pairs = q.reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).view(np.uint32)
    eight = q.reshape(rows, cols // 8, 8).astype(np.uint64)
    # 8 codes of `bits` bits make exactly `bits` bytes: build them in one uint64 and keep its low bytes.
    word = np.bitwise_or.reduce(eight << (np.arange(8, dtype=np.uint64) * np.uint64(bits)), axis=-1)
    stream = word.view(np.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]
    return np.ascontiguousarray(stream).reshape(rows, cols * bits // 8).view(np.uint32)


def dense(data: np.ndarray, type_name: str) -> np.ndarray:
    """Rows of any supported type → float32, equal to gguf-py's dequantization."""
    if type_name in _DECODERS:
        q, scales, biases = affine_codes(data, type_name)
        rows, cols = q.shape
        grouped = q.reshape(rows, -1, GROUP).astype(np.float32) * scales[..., None] + biases[..., None]
        return grouped.reshape(rows, cols)
    if type_name == "F32":
        return np.asarray(data, dtype=np.float32)
    if type_name == "F16":
        return np.asarray(data).astype(np.float32)
    return np.asarray(gguf_dequantize(data, _qtype(type_name)), dtype=np.float32)


@dataclass
class RequantError:
    """Running sums for the relative RMS error that requantizing added (‖requantized − file‖ / ‖file‖)."""

    tensors: int = 0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    max_abs: float = 0.0

    def add(self, original: np.ndarray, restored: np.ndarray) -> None:
        diff = restored - original
        self.squared_error += float(np.square(diff, dtype=np.float64).sum())
        self.squared_norm += float(np.square(original, dtype=np.float64).sum())
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))

    @property
    def relative_rms(self) -> float:
        return (self.squared_error / self.squared_norm) ** 0.5 if self.squared_norm else 0.0


def packed(
    data: np.ndarray, type_name: str, error: Optional[RequantError] = None
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a quantized type → (bits, packed uint32, float32 scales, float32 biases) in groups of 32."""
    if type_name in LOSSLESS_BITS:
        bits = LOSSLESS_BITS[type_name]
        q, scales, biases = affine_codes(data, type_name)
        return bits, pack(q, bits), scales, biases
    bits = REQUANT_BITS[type_name]
    original = dense(data, type_name)
    # MLX arrays, not the numpy ones the lossless branch binds: separate names keep each branch's types.
    mx_weights, mx_scales, mx_biases = mx.quantize(mx.array(original), group_size=GROUP, bits=bits)
    if error is not None:
        error.add(original, np.array(mx.dequantize(mx_weights, mx_scales, mx_biases, group_size=GROUP, bits=bits)))
    return (bits, np.array(mx_weights), np.array(mx_scales.astype(mx.float32)), np.array(mx_biases.astype(mx.float32)))


def _qtype(type_name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[type_name]


__all__ = ["GROUP", "RequantError", "affine_codes", "dense", "pack", "packed"]
