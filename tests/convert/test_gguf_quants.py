"""ggml block quants → MLX affine groups, checked against gguf-py's own dequantization, with real MLX.

Lossless types must come out equal in float32 (MLX's dequantize of our packed codes, scales and biases against
gguf-py's dequantize of the same bytes); requantized types within the error they report.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader

from mlx_server.convert import gguf_quants as gq
from mlx_server.convert.gguf import import_gguf
from mlx_server.models.gguf_file import LOSSLESS_BITS, REQUANT_BITS, meta, open_gguf, summarize
from support.gguf_builders import gguf_dequant, random_blocks, tiny_llama_gguf


def _mlx_dequant(bits: int, weights: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    return np.array(mx.dequantize(mx.array(weights), mx.array(scales), mx.array(biases), group_size=32, bits=bits))


@pytest.mark.parametrize("type_name", sorted(LOSSLESS_BITS))
def test_lossless_types_repack_exactly(type_name: str) -> None:
    rng = np.random.default_rng(len(type_name))
    data = random_blocks(type_name, rows=24, cols=512, rng=rng)
    want = gguf_dequant(data, type_name)
    bits, weights, scales, biases = gq.packed(data, type_name)
    assert bits == LOSSLESS_BITS[type_name] and weights.dtype == np.uint32
    assert weights.shape == (24, 512 * bits // 32) and scales.shape == biases.shape == (24, 512 // 32)
    np.testing.assert_array_equal(_mlx_dequant(bits, weights, scales, biases), want)
    np.testing.assert_array_equal(gq.dense(data, type_name), want)


def test_legacy_types_from_gguf_quantizer_repack_exactly() -> None:
    # The blocks gguf-py's (llama.cpp-exact) quantizer writes from real-valued weights, not just random bytes.
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    weights = np.random.default_rng(0).normal(0, 0.02, size=(16, 256)).astype(np.float32)
    for type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        data = quantize(weights, GGMLQuantizationType[type_name])
        bits, packed, scales, biases = gq.packed(data, type_name)
        np.testing.assert_array_equal(_mlx_dequant(bits, packed, scales, biases), gguf_dequant(data, type_name),
                                      err_msg=type_name)


@pytest.mark.parametrize("type_name", sorted(REQUANT_BITS))
def test_sub_block_types_are_requantized_with_their_error_measured(type_name: str) -> None:
    data = random_blocks(type_name, rows=16, cols=512, rng=np.random.default_rng(7))
    want = gguf_dequant(data, type_name)
    np.testing.assert_array_equal(gq.dense(data, type_name), want)  # the dense modes take gguf-py's values
    error = gq.RequantError()
    bits, weights, scales, biases = gq.packed(data, type_name, error)
    assert bits == REQUANT_BITS[type_name]
    got = _mlx_dequant(bits, weights, scales, biases)
    measured = float(np.sqrt(np.square(got - want).sum() / np.square(want).sum()))
    assert error.relative_rms == pytest.approx(measured, rel=1e-3)
    assert error.max_abs == pytest.approx(float(np.abs(got - want).max()), rel=1e-5)
    # Uniform random codes are the worst case for re-gridding; real weights do better (Q6_K: 0.5% on Gemma 3).
    assert 0 < error.relative_rms < {8: 0.006, 5: 0.045, 4: 0.06}[bits]


def test_pack_matches_mlx_layout_for_every_width() -> None:
    rng = np.random.default_rng(3)
    for bits in (2, 3, 4, 5, 6, 8):
        q = rng.integers(0, 2**bits, size=(4, 64), dtype=np.uint8)
        ones, zeros = np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32)
        np.testing.assert_array_equal(_mlx_dequant(bits, gq.pack(q, bits), ones, zeros), q.astype(np.float32))


def test_fast_reader_matches_stock_reader(tmp_path: Path) -> None:
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", {})
    stock, fast = GGUFReader(str(path)), open_gguf(path)
    assert list(stock.fields) == list(fast.fields)
    for key, field in stock.fields.items():
        assert fast.fields[key].contents() == field.contents(), key
        assert fast.fields[key].types == field.types, key
    assert [(t.name, t.tensor_type, t.data_offset) for t in stock.tensors] == \
           [(t.name, t.tensor_type, t.data_offset) for t in fast.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(stock.tensors, fast.tensors))
    assert meta(fast, "llama.block_count") == 1 and meta(fast, "missing", 7) == 7


def test_iq_types_are_refused_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tiny_llama_gguf(tmp_path / "iq.gguf", {"blk.0.ffn_down.weight": ("IQ4_XS", random_blocks("IQ4_XS", 256, 512,
                                                                                                rng))})
    summary = summarize(path)
    assert not summary.servable and "IQ4_XS" in summary.problems[0]
    with pytest.raises(ValueError, match=r"unsupported tensor type IQ4_XS \(1 tensors\)"):
        import_gguf(path, tmp_path / "cache", mode="quantized-f32")
    assert [p.name for p in (tmp_path / "cache" / "imports").iterdir()] == [".hashes"]  # nothing half-written
