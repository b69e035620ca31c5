"""models/quantize.py: Ollama's `quantize` names and the MLX mode each maps to."""

from __future__ import annotations

import pytest

from mlx_server.models.quantize import ACCEPTED, FLOAT_NAMES, QuantMode, quant_mode

# GGUF type → its bits per weight (codes plus the block's scales), to check each mode is the nearest one.
GGUF_BPW = {
    "q8_0": 8.5,
    "q6_K": 6.5625,
    "q5_0": 5.5,
    "q5_1": 6.0,
    "q5_K": 5.5,
    "q4_0": 4.5,
    "q4_1": 5.0,
    "q4_K": 4.5,
    "q3_K": 3.4375,
    "q2_K": 2.625,
}


@pytest.mark.parametrize(
    ("name", "bits", "group_size"),
    [
        ("q4", 4, 64),
        ("int4", 4, 64),
        ("q8", 8, 64),
        ("int8", 8, 64),
        ("q8_0", 8, 64),
        ("q6_K", 6, 64),
        ("q5_0", 5, 64),
        ("q5_1", 5, 32),
        ("q5_K_S", 5, 64),
        ("q5_K_M", 5, 64),
        ("q4_0", 4, 64),
        ("q4_1", 4, 32),
        ("q4_K_S", 4, 64),
        ("q4_K_M", 4, 64),
        ("q3_K_S", 3, 64),
        ("q3_K_M", 3, 64),
        ("q3_K_L", 3, 64),
        ("q2_K", 2, 64),
    ],
)
def test_names_map_to_mlx_modes(name: str, bits: int, group_size: int) -> None:
    mode = quant_mode(name)
    assert mode == QuantMode(bits, group_size)
    assert mode.label == f"MLX {bits}-bit, group size {group_size}"
    assert quant_mode(name.upper()) == quant_mode(name.lower()) == quant_mode(f" {name} ") == mode


@pytest.mark.parametrize("gguf_type", sorted(GGUF_BPW))
def test_each_gguf_type_gets_the_group_size_nearest_its_bits_per_weight(gguf_type: str) -> None:
    name = {"q5_K": "q5_K_M", "q4_K": "q4_K_M", "q3_K": "q3_K_M"}.get(gguf_type, gguf_type)
    mode = quant_mode(name)
    assert mode is not None
    nearest = min((32, 64, 128), key=lambda g: abs(QuantMode(mode.bits, g).bits_per_weight - GGUF_BPW[gguf_type]))
    assert mode.group_size == nearest and str(mode.bits) == gguf_type[1]


@pytest.mark.parametrize("name", ["f16", "FP16", "bf16", "f32", "fp32"])
def test_float_names_keep_the_weights(name: str) -> None:
    assert quant_mode(name) is None


@pytest.mark.parametrize("name", ["", "q7", "q4_K_X", "iq4_xs", "fp8", "4bit"])
def test_other_names_are_refused_naming_the_accepted_ones(name: str) -> None:
    with pytest.raises(ValueError, match="unsupported quantization type") as refused:
        quant_mode(name)
    assert "q4_K_M" in str(refused.value) and "q8_0" in str(refused.value) and "bf16" in str(refused.value)


def test_accepted_lists_every_name_in_ollamas_spelling() -> None:
    assert "q4_K_M" in ACCEPTED and "q4" in ACCEPTED and set(FLOAT_NAMES) <= set(ACCEPTED)
    assert all(quant_mode(name) is not None or name in FLOAT_NAMES for name in ACCEPTED)


@pytest.mark.parametrize(("bits", "group_size"), [(7, 64), (4, 16), (1, 64), (8, 256)])
def test_modes_mlx_cannot_pack_are_refused(bits: int, group_size: int) -> None:
    with pytest.raises(ValueError, match="MLX quantizes to bits 2, 3, 4, 5, 6, 8"):
        QuantMode(bits, group_size)


def test_bits_per_weight_counts_the_groups_scale_and_bias() -> None:
    assert QuantMode(4, 64).bits_per_weight == 4.5 and QuantMode(4, 32).bits_per_weight == 5.0
