"""Reading GGUF files without MLX: gguf-py's memory-mapped reader, made fast enough for real vocabularies.

gguf-py's `GGUFReader` parses every element of every metadata array into its own numpy memmap slice: a Gemma 3
vocabulary (262,144 tokens, scores and types) takes ~15 s on a slow core. `open_gguf` returns the same reader with
two of its parsing steps done in bulk (one array per numeric metadata array, one memoryview per string) — the
fields, tensors and `contents()` it hands out are the same (tests/convert/test_gguf_quants.py checks that against the
stock reader), and tensor data stays memory-mapped.

Also here, because `mlx-server ollama list` and /api/show need them without MLX: which tensor types and
architectures the importer can serve, and a short description of a file.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

import numpy as np
from gguf import GGUFReader, GGUFValueType

# Tensor types and what the importer does with them in the packed (quantized) modes. Lossless: the block's integer
# codes and its scale/offset become an MLX affine group of 32 exactly (checked against gguf-py in the tests).
LOSSLESS_BITS: Mapping[str, int] = MappingProxyType(
    {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
)
# Types with 16-weight sub-blocks (two scales inside one MLX group of 32): requantized with MLX's own quantizer, to
# the narrowest MLX width (at least the source's) whose added error stays well under the source's own rounding.
# Q6_K: on the Gemma 3 270M Q4_K_M file, 6-bit groups of 32 add 2.0% RMS error — as much noise again as Q6_K's own,
# on the tensors K_M mixes keep at higher precision on purpose — and 8-bit adds 0.5%. On uniformly random blocks
# (the worst case): Q3_K adds 7.4% at 4 bits, 3.5% at 5; Q2_K adds 4.8% at 4 bits (its own error is several times
# that). tests/convert/test_gguf_quants.py holds these bounds.
REQUANT_BITS: Mapping[str, int] = MappingProxyType({"Q6_K": 8, "Q3_K": 5, "Q2_K": 4})
DENSE_TYPES = frozenset({"F32", "F16", "BF16"})
# Architectures convert/gguf_arch.py converts (the test suite checks both lists agree).
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "command-r")
# Tensors of a multimodal file that belong to the vision tower or its projector: a text model leaves them out.
VISION_PREFIXES = ("v.", "mm.", "vision_", "multi_modal_projector")


def open_gguf(path: Path | str) -> GGUFReader:
    """A `GGUFReader` over `path` (memory-mapped); metadata arrays parsed in bulk."""
    return _FastReader(str(path), "r")


class _FastReader(GGUFReader):
    # The stock _get slices the np.memmap, whose subclass bookkeeping costs ~10 µs per call; a plain ndarray view
    # of the same mapping returns the same bytes.
    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Optional[str] = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        kind = np.dtype(dtype)
        arr = plain[offset : offset + kind.itemsize * int(count)].view(kind)[: int(count)]
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        item_type, n = GGUFValueType(int(raw_itype[0])), int(count[0])
        offs = orig_offs + 12
        if item_type == GGUFValueType.STRING:
            # One memoryview per string: contents() only calls .tobytes() on it.
            view = memoryview(self.__dict__["_plain"])
            parts: list[Any] = [raw_itype, count]
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(n):
                (size,) = unpack(view, offs)
                parts.append(view[offs + 8 : offs + 8 + size])
                offs += 8 + size
            return offs - orig_offs, parts, list(range(2, n + 2)), [GGUFValueType.ARRAY, item_type]
        np_type = self.gguf_scalar_to_np.get(item_type)
        if np_type is None or n == 0:  # nested arrays (none in files we know) and empty ones: the stock path
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, np_type, n)
        return 12 + int(values.nbytes), [raw_itype, count, values], [2], [GGUFValueType.ARRAY, item_type]


def meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value as plain Python (str, int, float, bool, list), or `default`."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def type_support(type_name: str) -> str:
    """ "lossless", "requantized", "dense" or "unsupported": what the importer does with a tensor type."""
    if type_name in LOSSLESS_BITS:
        return "lossless"
    if type_name in REQUANT_BITS:
        return "requantized"
    return "dense" if type_name in DENSE_TYPES else "unsupported"


def is_vision_tensor(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


@dataclass(frozen=True)
class GGUFSummary:
    """What `mlx-server ollama list` shows about a file, and why it cannot be served when it cannot."""

    architecture: str
    tensor_types: Mapping[str, int]  # type name -> tensors of that type (text-model tensors only)
    parameters: int
    has_chat_template: bool
    vision_tensors: int = 0
    problems: tuple[str, ...] = field(default=())

    @property
    def servable(self) -> bool:
        return not self.problems


def summarize(path: Path | str) -> GGUFSummary:
    reader = open_gguf(path)
    arch = str(meta(reader, "general.architecture", "unknown"))
    text = [t for t in reader.tensors if not is_vision_tensor(t.name)]
    types = Counter(t.tensor_type.name for t in text)
    problems = []
    if arch not in SUPPORTED_ARCHS:
        problems.append(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    bad = sorted(name for name in types if type_support(name) == "unsupported")
    if bad:
        problems.append(f"unsupported tensor type{'s' if len(bad) > 1 else ''} {', '.join(bad)}")
    return GGUFSummary(
        architecture=arch,
        tensor_types=dict(sorted(types.items())),
        parameters=sum(int(t.n_elements) for t in text),
        has_chat_template=bool(meta(reader, "tokenizer.chat_template")),
        vision_tensors=len(reader.tensors) - len(text),
        problems=tuple(problems),
    )


__all__ = [
    "DENSE_TYPES",
    "GGUFSummary",
    "LOSSLESS_BITS",
    "REQUANT_BITS",
    "SUPPORTED_ARCHS",
    "is_vision_tensor",
    "meta",
    "open_gguf",
    "summarize",
    "type_support",
]
