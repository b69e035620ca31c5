"""Ollama's `quantize` names, mapped to the MLX quantization that /api/create applies (convert/quantize.py). No MLX.

MLX's affine quantization stores each group of `group_size` weights as `bits`-bit codes plus a float16 scale and
bias: `bits + 32 / group_size` bits per weight. Ollama's GGUF types name their width; the MLX mode for one keeps that
width and takes the group size (32, 64 or 128) whose bits per weight come nearest the GGUF type's:

| asked | GGUF bits/weight | MLX mode (bits/weight) |
| --- | --- | --- |
| q4, int4 | - | 4-bit, group 64 (4.5): mlx_lm's default, what mlx-community's "4bit" models are |
| q8, int8 | - | 8-bit, group 64 (8.5) |
| q8_0 | 8.5 | 8-bit, group 64 (8.5) |
| q6_K | 6.56 | 6-bit, group 64 (6.5) |
| q5_0, q5_K_S, q5_K_M | 5.5 | 5-bit, group 64 (5.5) |
| q5_1 | 6.0 | 5-bit, group 32 (6.0) |
| q4_0, q4_K_S, q4_K_M | 4.5 | 4-bit, group 64 (4.5) |
| q4_1 | 5.0 | 4-bit, group 32 (5.0) |
| q3_K_S, q3_K_M, q3_K_L | 3.44 | 3-bit, group 64 (3.5) |
| q2_K | 2.63 | 2-bit, group 64 (2.5) |

A K-quant's _S/_M/_L mixes (some tensors at a higher width) are not copied: every quantized layer gets the one
mode (the layers whose width a group does not divide stay float, as mlx_lm leaves them).

The float names (`f16`, `fp16`, `bf16`, `f32`, `fp32`) map to None: no quantization, the weights are kept as they
are. Ollama would convert between float types; MLX serves float16, bfloat16 and float32 weights alike, so a copy in
another float type would buy nothing but disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

MLX_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
MLX_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantMode:
    """One MLX affine quantization: `bits` per weight code, one scale and bias per `group_size` weights."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in MLX_BITS or self.group_size not in MLX_GROUP_SIZES:
            raise ValueError(
                f"MLX quantizes to bits {', '.join(map(str, MLX_BITS))} in groups of "
                f"{', '.join(map(str, MLX_GROUP_SIZES))}, not {self.bits}-bit groups of {self.group_size}"
            )

    @property
    def label(self) -> str:
        """How the status lines name it."""
        return f"MLX {self.bits}-bit, group size {self.group_size}"

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 32 / self.group_size  # the float16 scale and bias of each group


_MODES: Mapping[str, QuantMode] = MappingProxyType(
    {
        "q4": QuantMode(4, 64),
        "int4": QuantMode(4, 64),
        "q8": QuantMode(8, 64),
        "int8": QuantMode(8, 64),
        "q8_0": QuantMode(8, 64),
        "q6_k": QuantMode(6, 64),
        "q5_0": QuantMode(5, 64),
        "q5_k_s": QuantMode(5, 64),
        "q5_k_m": QuantMode(5, 64),
        "q5_1": QuantMode(5, 32),
        "q4_0": QuantMode(4, 64),
        "q4_k_s": QuantMode(4, 64),
        "q4_k_m": QuantMode(4, 64),
        "q4_1": QuantMode(4, 32),
        "q3_k_s": QuantMode(3, 64),
        "q3_k_m": QuantMode(3, 64),
        "q3_k_l": QuantMode(3, 64),
        "q2_k": QuantMode(2, 64),
    }
)
FLOAT_NAMES = ("f16", "fp16", "bf16", "f32", "fp32")

# Ollama's spelling (upper-case K, lower-case q), for the error message.
ACCEPTED = tuple("q" + name[1:].upper() if name.startswith("q") else name for name in _MODES) + FLOAT_NAMES


def quant_mode(name: str) -> Optional[QuantMode]:
    """The MLX mode for an Ollama `quantize` name (any case); None for a float name (weights kept as they are).

    Raises ValueError naming the accepted names for any other."""
    key = name.strip().lower()
    if key in FLOAT_NAMES:
        return None
    mode = _MODES.get(key)
    if mode is None:
        raise ValueError(
            f"unsupported quantization type {name!r}: use one of {', '.join(ACCEPTED)} "
            "(mapped to the nearest MLX mode; the float types keep the weights as they are)"
        )
    return mode


__all__ = ["ACCEPTED", "FLOAT_NAMES", "MLX_BITS", "MLX_GROUP_SIZES", "QuantMode", "quant_mode"]
