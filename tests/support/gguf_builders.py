"""Tiny GGUF files written with gguf-py for the import tests: real tensor types, random weights.

Quantized tensors are random blocks: every byte pattern of a ggml block is a valid encoding, so random bytes with
sensible float16 scales give real Q4_K / Q5_K / Q6_K / … tensors without an encoder. What a test compares against
is always gguf-py's own dequantization of the bytes written, put back into Hugging Face order by the rules of
llama.cpp's convert_hf_to_gguf.py as spelled out here (independently of mlx_server's importer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# byte offsets of the float16 fields in each block: (scale offsets, min offsets), and the magnitude of one code
_F16_FIELDS: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    "Q4_0": ((0,), (), 1 / 8), "Q4_1": ((0,), (2,), 1 / 8), "Q5_0": ((0,), (), 1 / 16), "Q5_1": ((0,), (2,), 1 / 16),
    "Q8_0": ((0,), (), 1 / 128), "Q4_K": ((0,), (2,), 1 / 256), "Q5_K": ((0,), (2,), 1 / 512),
    "Q6_K": ((208,), (), 1 / 2048), "Q3_K": ((108,), (), 1 / 128), "Q2_K": ((80,), (82,), 1 / 16),
    "IQ4_XS": ((0,), (), 1 / 64),
}


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """(rows, bytes per row) uint8 of random `type_name` blocks whose weights are roughly ±`scale`."""
    per_block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, size), dtype=np.uint8)
    scales, mins, unit = _F16_FIELDS[type_name]
    d = (scale * unit * rng.uniform(0.5, 1.5, size=(blocks.shape[0], 1))).astype(np.float16)
    for at in scales:
        blocks[:, at:at + 2] = d.view(np.uint8)
    # Q4_1/Q5_1 add their min m (negative half the range keeps weights around zero); K-quants subtract dmin * m_j.
    half = {"Q4_1": -8.0, "Q5_1": -16.0}.get(type_name, 1.0)
    for at in mins:
        blocks[:, at:at + 2] = (d.astype(np.float32) * half).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_dequant(data: np.ndarray, type_name: str) -> np.ndarray:
    return np.asarray(dequantize(data, GGMLQuantizationType[type_name]), dtype=np.float32)


def byte_level_vocab(extra: tuple[str, ...] = ()) -> list[str]:
    """A GPT-2 byte-level vocabulary: the 256 byte symbols, one merge's result ("Ġt"), then `extra` whole tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [*bytes_to_unicode().values(), "Ġt", *extra]


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF Q/K rows → llama.cpp's interleaved order."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_rows, derived from it: scatter the file's rows back through its index."""
    rows = w.shape[0]
    index = permute_rows(np.arange(rows), n_heads)
    out = np.empty_like(w)
    out[index] = w
    return out


def write_gguf(path: Path, arch: str, meta: Mapping[str, Any], tensors: Mapping[str, tuple[str, np.ndarray]],
               vocab: list[str], token_types: Optional[list[int]] = None, *, tokenizer_model: str = "gpt2",
               eos: int = 0, bos: Optional[int] = None, chat_template: Optional[str] = None,
               merges: tuple[str, ...] = ("Ġ t",)) -> None:
    """A GGUF with `meta` under `arch.`, a byte-level tokenizer, and tensors {gguf name: (type, data)}."""
    writer = GGUFWriter(str(path), arch)
    for key, value in meta.items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_string(full, str(value))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(vocab)
    writer.add_token_types(token_types or [1] * len(vocab))
    if tokenizer_model == "gpt2":
        writer.add_token_merges(list(merges))
    writer.add_eos_token_id(eos)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(bos is not None)
    if chat_template:
        writer.add_chat_template(chat_template)
    for name, (type_name, data) in tensors.items():
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, data.astype(np.float32 if type_name == "F32" else np.float16))
        else:
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_dir(path: Path, config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> Path:
    """An ordinary mlx_lm model dir (config.json + float32 safetensors) holding `weights`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(config)))
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    return path


def logits(model: Callable[..., Any], ids: list[int]) -> np.ndarray:
    """Every position's logits, float32 (positions, vocab)."""
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def tiny_llama_gguf(path: Path, extra: Optional[Mapping[str, tuple[str, np.ndarray]]] = None,
                    arch: str = "llama") -> Path:
    """A one-layer llama GGUF (hidden 256, Q4_K linears, Q8_0 embedding); `extra` adds or replaces tensors."""
    rng = np.random.default_rng(1)
    vocab = byte_level_vocab(("<|endoftext|>",))
    ones = np.ones(256, np.float32)
    tensors = {"token_embd.weight": ("Q8_0", random_blocks("Q8_0", len(vocab), 256, rng)),
               "output_norm.weight": ("F32", ones), "blk.0.attn_norm.weight": ("F32", ones),
               "blk.0.ffn_norm.weight": ("F32", ones)}
    for part, (rows, cols) in {"attn_q": (256, 256), "attn_k": (256, 256), "attn_v": (256, 256),
                               "attn_output": (256, 256), "ffn_gate": (512, 256), "ffn_up": (512, 256),
                               "ffn_down": (256, 512)}.items():
        tensors[f"blk.0.{part}.weight"] = ("Q4_K", random_blocks("Q4_K", rows, cols, rng))
    tensors.update(extra or {})
    write_gguf(path, arch, {"context_length": 128, "embedding_length": 256, "block_count": 1,
                            "feed_forward_length": 512, "attention.head_count": 4, "attention.head_count_kv": 4,
                            "attention.layer_norm_rms_epsilon": 1e-5}, tensors, vocab, eos=len(vocab) - 1)
    return path
