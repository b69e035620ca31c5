"""Write safetensors files piece by piece, so converting a model never holds more than a slice of it in memory.

The safetensors header lists every tensor's dtype, shape and byte range up front, and the GGUF importer knows them
all before reading a single weight (they follow from the tensor table and the weight format). So each shard's
header is written first and every slice of rows is then written straight to its place in the file (pwrite); a
tensor never has to exist whole, in numpy or in MLX. The files are ordinary safetensors (`mx.load` reads them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

DTYPES: Mapping[str, tuple[str, int]] = {  # name → (safetensors dtype, bytes per element)
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "uint32": ("U32", 4),
}
SHARD_BYTES = 2 * 2**30  # like mlx_lm's shards, smaller: a 40 GB model becomes 20 files


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * DTYPES[self.dtype][1]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (or uint32) values as the bytes of `dtype`; bfloat16 as uint16 words, rounded to nearest even."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
        nan = np.isnan(values)  # NaN must stay NaN: rounding could carry its payload into infinity's pattern
        return np.where(nan, np.uint16(0x7FC0), rounded) if nan.any() else rounded
    return np.ascontiguousarray(
        values, dtype={"float32": np.float32, "float16": np.float16, "uint32": np.uint32}[dtype]
    )


class ShardWriter:
    """One safetensors file: header at open, then rows of any tensor written at their place, in any order."""

    def __init__(self, path: Path, entries: Iterable[Entry], metadata: Mapping[str, str]) -> None:
        self.path = path
        self.entries = {e.name: e for e in entries}
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, int] = {}
        position = 0
        for entry in self.entries.values():
            header[entry.name] = {
                "dtype": DTYPES[entry.dtype][0],
                "shape": list(entry.shape),
                "data_offsets": [position, position + entry.nbytes],
            }
            self.offsets[entry.name] = position
            position += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + position
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)
        _write_all(self.fd, len(raw).to_bytes(8, "little") + raw, 0)

    def write_rows(self, name: str, first_row: int, rows: np.ndarray) -> None:
        entry = self.entries[name]
        data = np.ascontiguousarray(rows)
        expected = rows.shape[0] * entry.row_bytes if len(entry.shape) > 1 else entry.nbytes
        if data.nbytes != expected:
            raise ValueError(f"{name}: {data.nbytes} bytes do not fit rows of {entry.shape} {entry.dtype}")
        # data.data is the buffer memoryview(data) would give; numpy types ndarray as a Buffer only for 3.12+.
        _write_all(self.fd, data.data.cast("B"), self.data_start + self.offsets[name] + first_row * entry.row_bytes)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def shard_groups(groups: list[list[Entry]], limit: int = SHARD_BYTES) -> list[list[Entry]]:
    """Split entries into shards of at most `limit` bytes, never splitting a group (a layer's weight/scales/biases)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(e.nbytes for e in group)
        if shards[-1] and size + group_bytes > limit:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


__all__ = ["DTYPES", "Entry", "SHARD_BYTES", "ShardWriter", "shard_groups", "shard_names", "to_dtype"]
