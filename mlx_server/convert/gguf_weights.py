"""The weights half of a GGUF import: which MLX tensors a GGUF's tensors become, written one slice at a time.

gguf.py picks the mode, checks disk space and writes the tokenizer, config and marker; this module plans each tensor
(name, packed bits or dense, rows to un-permute, norm shift) and streams it into the safetensors shards. Per slice,
ggml blocks become MLX affine groups of 32 (gguf_quants.py) or dense floats, rows and norms are put back the way
mlx_lm's model class expects (gguf_arch.py), and the bytes go straight to their place in the output
(safetensors_stream.py), so memory stays at a slice (a few MB to ~100 MB) whatever the model's size.
"""

from __future__ import annotations

import json
import mmap
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from mlx_server.convert import gguf_quants as gq
from mlx_server.convert.gguf_arch import Arch, hf_name, is_norm, row_heads, unpermute_rows
from mlx_server.convert.safetensors_stream import Entry, ShardWriter, shard_groups, shard_names, to_dtype
from mlx_server.models.gguf_file import LOSSLESS_BITS, REQUANT_BITS, type_support

_SLICE_WEIGHTS = 4 * 2**20  # weights converted at once: bounds the temporaries (~30 bytes per weight at most)

Progress = Callable[[int, int], None]  # (bytes of the file converted so far, total)


@dataclass
class Plan:
    """One GGUF tensor and what it becomes."""

    tensor: Any  # gguf ReaderTensor (memory-mapped data)
    name: str  # mlx_lm parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    type_name: str
    bits: Optional[int]  # packed into MLX groups of 32 with this many bits; None: dense
    heads: Optional[int]  # rows to un-permute per head (llama Q/K)
    shift: float  # subtracted (gemma's +1 norms)
    entries: list[Entry] = field(default_factory=list)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def plan_tensors(
    tensors: list[Any], arch: Arch, config: Mapping[str, Any], keep_quants: bool, dtype: str
) -> list[Plan]:
    plans = []
    for t in tensors:
        name = hf_name(arch, t.name)
        if name is None:
            continue
        type_name = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        quantized = type_support(type_name) in ("lossless", "requantized")
        bits = (LOSSLESS_BITS.get(type_name) or REQUANT_BITS[type_name]) if keep_quants and quantized else None
        p = Plan(t, name, type_name, bits, row_heads(arch, t.name, config), arch.norm_shift if is_norm(t.name) else 0.0)
        if bits is None:
            p.entries = [Entry(name, dtype, shape)]
        else:
            rows, cols = shape
            p.entries = [
                Entry(name, "uint32", (rows, cols * bits // 32)),
                Entry(f"{p.module}.scales", dtype, (rows, cols // gq.GROUP)),
                Entry(f"{p.module}.biases", dtype, (rows, cols // gq.GROUP)),
            ]
        plans.append(p)
    return plans


def write_weights(
    reader: Any, plan: list[Plan], out: Path, dtype: str, progress: Optional[Progress]
) -> dict[str, gq.RequantError]:
    """Every planned tensor into safetensors shards, slice by slice; returns requantization error per type."""
    shards = shard_groups([p.entries for p in plan])
    names = shard_names(len(shards))
    owner = {e.name: i for i, shard in enumerate(shards) for e in shard}
    writers = [ShardWriter(out / n, shard, {"format": "mlx"}) for n, shard in zip(names, shards, strict=True)]
    errors: dict[str, gq.RequantError] = defaultdict(gq.RequantError)
    total, done = sum(int(p.tensor.n_bytes) for p in plan), 0
    try:
        for p in plan:
            writer = writers[owner[p.name]]
            error = errors[p.type_name] if p.type_name in REQUANT_BITS and p.bits is not None else None
            if error is not None:
                error.tensors += 1
            row_bytes = int(p.tensor.n_bytes) // max(p.tensor.data.shape[0], 1)
            for first, data in _slices(p):
                _write_slice(writer, p, first, data, dtype, error)
                _release(reader, int(p.tensor.data_offset) + first * row_bytes, int(data.nbytes))
            done += int(p.tensor.n_bytes)
            if progress is not None:
                progress(done, total)
    finally:
        for w in writers:
            w.close()
    weight_map = {e.name: names[owner[e.name]] for p in plan for e in p.entries}
    index = {
        "metadata": {"total_size": sum(e.nbytes for p in plan for e in p.entries)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dict(errors)


def _slices(p: Plan) -> Any:
    data = p.tensor.data
    if data.ndim == 1:
        yield 0, data
        return
    rows = data.shape[0]
    cols = int(p.tensor.n_elements) // rows
    unit = rows // p.heads if p.heads else 1  # a slice holds whole heads, so un-permuting stays inside it
    step = max(unit, _SLICE_WEIGHTS // max(cols, 1) // unit * unit)
    for first in range(0, rows, step):
        yield first, data[first : first + step]


def _write_slice(
    writer: ShardWriter, p: Plan, first: int, data: np.ndarray, dtype: str, error: Optional[gq.RequantError]
) -> None:
    heads = None if p.heads is None else data.shape[0] // (p.tensor.data.shape[0] // p.heads)
    if p.bits is None:
        values = gq.dense(data, p.type_name)
        if p.shift:
            values = values - np.float32(p.shift)
        if heads:
            values = unpermute_rows(values, heads)
        writer.write_rows(p.name, first, to_dtype(values, dtype))
        return
    _, weights, scales, biases = gq.packed(data, p.type_name, error)
    parts = (weights, to_dtype(scales, dtype), to_dtype(biases, dtype))
    for entry, part in zip(p.entries, parts, strict=True):  # weight, scales, biases
        # The permutation moves whole rows, so it applies alike to packed weights, scales and biases.
        writer.write_rows(entry.name, first, unpermute_rows(part, heads) if heads else part)


def _release(reader: Any, offset: int, length: int) -> None:
    # Pages of the memory-mapped file stay in this process's RSS until unmapped, a whole tensor's (an 8B model's
    # embedding: ~0.5 GB) by its end; drop each slice's once converted. They are clean file pages: nothing is
    # lost, and the page cache may keep them.
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = offset + length
    try:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError, AttributeError):
        pass


def quantization_config(packed: Mapping[str, int]) -> dict[str, Any]:
    # The most common width is the default; mlx_lm takes per-module entries for the rest
    # (a Q4_K_M file keeps some tensors in Q5_0, Q6_K or Q8_0).
    bits = Counter(packed.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": gq.GROUP, "bits": bits, "mode": "affine"}
    for name, b in sorted(packed.items()):
        if b != bits:
            config[name] = {"group_size": gq.GROUP, "bits": b, "mode": "affine"}
    return config
