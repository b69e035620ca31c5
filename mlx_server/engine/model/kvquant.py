"""A quantized KV cache that works inside mlx_lm's continuous batch.

mlx_lm ships a quantized cache for one sequence (`QuantizedKVCache`) but no batched form of it, so BatchGenerator
cannot merge such caches into its batch (mlx-lm issue #1043). This module adds the two halves:

* `SequenceQuantizedKVCache`: the per-sequence cache a prompt is prefilled into, stored in the prompt cache and
  fetched back from it. It is mlx_lm's cache plus `merge` (what BatchGenerator asks the first cache of a layer for
  when sequences join) and the `size`/`nbytes` answers the batch and the prompt cache rely on.
* `BatchQuantizedKVCache`: the batch's cache, laid out like mlx_lm's `BatchKVCache` (rows left-padded to a shared
  index, per-row rope offsets) but holding keys and values as `mx.quantize` triples (packed data, scales, biases).
  Its `bits` and `group_size` attributes send mlx_lm's attention down the quantized path.

Quantization groups run along the head dimension, one token at a time, so a token's stored form never depends on
which batch it sat in or how much padding surrounded it: batching changes nothing but the padding the mask hides.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, cast

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

GROUP_SIZE = 64
KV_BITS = {"q8": 8, "q4": 4}
KV_SETTINGS = ("f16", *KV_BITS)  # "f16": the model's own cache, in its activation dtype (no quantization)

Quantized = tuple[mx.array, mx.array, mx.array]  # (packed uint32 data, scales, biases), as mx.quantize returns


def _slice_tokens(q: Quantized, start: int, stop: int) -> Quantized:
    return (q[0][..., start:stop, :], q[1][..., start:stop, :], q[2][..., start:stop, :])


def _pad_tokens(q: Quantized, left: int, right: int) -> Quantized:
    if left == 0 and right == 0:
        return q
    widths = [(0, 0), (0, 0), (left, right), (0, 0)]
    return (mx.pad(q[0], widths), mx.pad(q[1], widths), mx.pad(q[2], widths))


def _zeros_like_tokens(q: Quantized, rows: int, tokens: int) -> Quantized:
    heads = q[0].shape[1]
    return (
        mx.zeros((rows, heads, tokens, q[0].shape[-1]), q[0].dtype),
        mx.zeros((rows, heads, tokens, q[1].shape[-1]), q[1].dtype),
        mx.zeros((rows, heads, tokens, q[2].shape[-1]), q[2].dtype),
    )


def _concat_tokens(a: Quantized, b: Quantized) -> Quantized:
    return (
        mx.concatenate([a[0], b[0]], axis=2),
        mx.concatenate([a[1], b[1]], axis=2),
        mx.concatenate([a[2], b[2]], axis=2),
    )


def _roll_rows_right(q: Quantized, shifts: mx.array) -> Quantized:
    """Rotate each row's tokens right by its own shift (rows of one batch need different amounts)."""
    length = q[0].shape[2]
    index = (mx.arange(length)[None, :] - shifts[:, None]) % length
    index = index[:, None, :, None]
    return (
        mx.take_along_axis(q[0], index, axis=2),
        mx.take_along_axis(q[1], index, axis=2),
        mx.take_along_axis(q[2], index, axis=2),
    )


def _quantized_nbytes(*parts: Optional[Quantized]) -> int:
    return sum(x.nbytes for q in parts if q is not None for x in q)


class SequenceQuantizedKVCache(QuantizedKVCache):
    """One sequence's quantized KV: mlx_lm's `QuantizedKVCache`, made able to join a BatchGenerator batch."""

    def __init__(self, group_size: int = GROUP_SIZE, bits: int = 8) -> None:
        super().__init__(group_size=group_size, bits=bits)

    def size(self) -> int:
        # Upstream leaves this at the base class's 0 ("unknown"); callers sizing a prefix or a batch row need it.
        return 0 if self.keys is None else int(self.offset)

    @property
    def nbytes(self) -> int:
        # Upstream's sum fails on a fresh cache (keys None); BatchGenerator counts caches still waiting to join.
        return _quantized_nbytes(self.keys, self.values)

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


class BatchQuantizedKVCache:
    """The batch's quantized KV, row `i` holding its tokens at `[left_padding[i], _idx)` of a shared buffer.

    `offset` is each row's rope position (its token count), `_idx` the buffer's filled length, as in mlx_lm's
    `BatchKVCache`; the buffer grows `step` tokens at a time so a decode step rarely reallocates it.
    """

    step = 256

    def __init__(self, left_padding: Sequence[int], group_size: int = GROUP_SIZE, bits: int = 8) -> None:
        self.keys: Optional[Quantized] = None
        self.values: Optional[Quantized] = None
        # int32 explicitly: an empty batch's mx.array([]) would be float and poison later concatenations.
        self.left_padding = mx.array(list(left_padding), dtype=mx.int32)
        self.offset = -self.left_padding
        self._idx = 0
        self._right_padding: Optional[mx.array] = None
        self.group_size = group_size
        self.bits = bits

    # ---- what the model's attention calls ---------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or self.values is None or prev + n > self.keys[0].shape[2]:
            self._grow(keys, values, n)
        assert self.keys is not None and self.values is not None
        new_k = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        new_v = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for dst, src in zip((*self.keys, *self.values), (*new_k, *new_v), strict=True):
            dst[..., prev : prev + n, :] = src
        self._idx += n
        self.offset = self.offset + n
        return self.keys_and_values()

    def _grow(self, keys: mx.array, values: mx.array, n: int) -> None:
        room = -(-n // self.step) * self.step
        fresh_k, fresh_v = self._empty(keys, room), self._empty(values, room)
        if self.keys is None or self.values is None:
            self.keys, self.values = fresh_k, fresh_v
        else:
            # Anything past _idx is stale (trimmed or padding), so the new room starts right at _idx.
            self.keys = _concat_tokens(_slice_tokens(self.keys, 0, self._idx), fresh_k)
            self.values = _concat_tokens(_slice_tokens(self.values, 0, self._idx), fresh_v)

    def _empty(self, x: mx.array, tokens: int) -> Quantized:
        """Zeroed room for `tokens` tokens of `x`'s rows and heads, in mx.quantize's layout."""
        rows, heads, _, dim = x.shape
        if dim % self.group_size:
            raise ValueError(f"head size {dim} does not divide into quantization groups of {self.group_size}")
        shape = (rows, heads, tokens)
        return (
            mx.zeros((*shape, dim * self.bits // 32), mx.uint32),
            mx.zeros((*shape, dim // self.group_size), x.dtype),
            mx.zeros((*shape, dim // self.group_size), x.dtype),
        )

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        assert self.keys is not None and self.values is not None
        return _slice_tokens(self.keys, 0, self._idx), _slice_tokens(self.values, 0, self._idx)

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        # Always an array: rows differ in padding, and the quantized attention takes boolean masks.
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    # ---- what BatchGenerator calls ------------------------------------------------------------------------

    def prepare(
        self,
        *,
        left_padding: Optional[Sequence[int]] = None,
        lengths: Optional[Sequence[int]] = None,
        right_padding: Optional[Sequence[int]] = None,
    ) -> None:
        """Before a prefill of unequal prompts: extra left padding (empty cache only), or right padding that
        `finalize` moves to the left once the padded chunk has gone through the model."""
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty BatchQuantizedKVCache")
            extra = mx.array(list(left_padding), dtype=mx.int32)
            self.left_padding = self.left_padding + extra
            self.offset = self.offset - extra
        if right_padding is not None and max(right_padding, default=0) > 0:
            self._right_padding = mx.array(list(right_padding), dtype=mx.int32)

    def finalize(self) -> None:
        if self._right_padding is None:
            return
        shifts, self._right_padding = self._right_padding, None
        if self.keys is not None and self.values is not None:
            # Rolling the whole buffer carries each row's trailing pads round to its front, where they become
            # left padding that the mask already hides.
            self.keys = _roll_rows_right(self.keys, shifts)
            self.values = _roll_rows_right(self.values, shifts)
        self.offset = self.offset - shifts
        self.left_padding = self.left_padding + shifts

    def filter(self, batch_indices: Sequence[int]) -> None:
        """Keep only these rows, then drop the padding columns every kept row has."""
        keep = mx.array(list(batch_indices), dtype=mx.int32)
        if self.keys is not None and self.values is not None:
            self.keys = (self.keys[0][keep], self.keys[1][keep], self.keys[2][keep])
            self.values = (self.values[0][keep], self.values[1][keep], self.values[2][keep])
        self.offset = self.offset[keep]
        self.left_padding = self.left_padding[keep]
        if not batch_indices:
            return
        shared = min(cast(list[int], self.left_padding.tolist()))
        if shared > 0:
            if self.keys is not None and self.values is not None:
                self.keys = _slice_tokens(self.keys, shared, self.keys[0].shape[2])
                self.values = _slice_tokens(self.values, shared, self.values[0].shape[2])
            self._idx -= shared
            self.left_padding = self.left_padding - shared

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Append `other`'s rows, right-aligning both at the longer filled index (the shorter gains left padding)."""
        if (other.bits, other.group_size) != (self.bits, self.group_size):
            raise ValueError(
                f"cannot batch a {other.bits}-bit (group {other.group_size}) KV cache with a "
                f"{self.bits}-bit (group {self.group_size}) one"
            )
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            self._idx = max(self._idx, other._idx)
            return
        idx = max(self._idx, other._idx)
        source = self if self.keys is not None else other
        assert source.keys is not None and source.values is not None
        template_k = _slice_tokens(source.keys, 0, 0)
        template_v = _slice_tokens(source.values, 0, 0)

        def aligned(c: BatchQuantizedKVCache) -> tuple[Quantized, Quantized, mx.array]:
            shift = idx - c._idx
            if c.keys is None or c.values is None:
                rows = c.offset.shape[0]
                k, v = _zeros_like_tokens(template_k, rows, idx), _zeros_like_tokens(template_v, rows, idx)
            else:
                k = _pad_tokens(_slice_tokens(c.keys, 0, c._idx), shift, 0)
                v = _pad_tokens(_slice_tokens(c.values, 0, c._idx), shift, 0)
            return k, v, c.left_padding + shift

        ka, va, pa = aligned(self)
        kb, vb, pb = aligned(other)
        self.keys = _concat_rows(ka, kb)
        self.values = _concat_rows(va, vb)
        self.left_padding = mx.concatenate([pa, pb])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = idx

    def extract(self, idx: int) -> SequenceQuantizedKVCache:
        """Row `idx` as a cache of its own, copied out so it does not keep the batch's buffers alive."""
        cache = SequenceQuantizedKVCache(group_size=self.group_size, bits=self.bits)
        if self.keys is None or self.values is None:
            return cache
        start = cast(list[int], self.left_padding.tolist())[idx]
        k = _slice_tokens(self.keys, start, self._idx)
        v = _slice_tokens(self.values, start, self._idx)
        # Through `state`: upstream declares keys/values as None, so assigning the triples would not type-check.
        cache.state = (_row(k, idx), _row(v, idx), self._idx - start, self.group_size, self.bits)
        return cache

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> BatchQuantizedKVCache:
        """A batch of single-sequence quantized caches (any may be empty), right-aligned on the longest."""
        if not caches:
            raise ValueError("cannot merge an empty list of caches")
        settings = {(c.bits, c.group_size) for c in caches}
        if len(settings) > 1:
            raise ValueError(f"cannot batch KV caches quantized differently: {sorted(settings)} (bits, group_size)")
        bits, group_size = settings.pop()
        # offset, not size(): a plain upstream QuantizedKVCache merges too, and its size() is always 0.
        lengths = [0 if c.keys is None else int(c.offset) for c in caches]
        longest = max(lengths)
        batch = cls([longest - n for n in lengths], group_size=group_size, bits=bits)
        if longest == 0:
            return batch
        source = next(c for c in caches if c.keys is not None)
        template_k, template_v = _slice_tokens(source.keys, 0, 0), _slice_tokens(source.values, 0, 0)
        rows_k, rows_v = [], []
        for c, n in zip(caches, lengths, strict=True):
            if n == 0:
                rows_k.append(_zeros_like_tokens(template_k, 1, longest))
                rows_v.append(_zeros_like_tokens(template_v, 1, longest))
            else:
                rows_k.append(_pad_tokens(_slice_tokens(c.keys, 0, n), longest - n, 0))
                rows_v.append(_pad_tokens(_slice_tokens(c.values, 0, n), longest - n, 0))
        batch.keys = _concat_rows(*rows_k)
        batch.values = _concat_rows(*rows_v)
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch

    # ---- bookkeeping --------------------------------------------------------------------------------------

    @property
    def state(self) -> tuple[Any, ...]:
        return self.keys, self.values, self.offset, self.left_padding, self._idx, self.group_size, self.bits

    @state.setter
    def state(self, v: tuple[Any, ...]) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx, self.group_size, self.bits = v

    @classmethod
    def from_state(cls, state: tuple[Any, ...]) -> BatchQuantizedKVCache:
        cache = cls([])
        cache.state = state
        return cache

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return _quantized_nbytes(self.keys, self.values)


def _row(q: Quantized, idx: int) -> Quantized:
    return (mx.contiguous(q[0][idx : idx + 1]), mx.contiguous(q[1][idx : idx + 1]), mx.contiguous(q[2][idx : idx + 1]))


def _concat_rows(*parts: Quantized) -> Quantized:
    return (
        mx.concatenate([p[0] for p in parts]),
        mx.concatenate([p[1] for p in parts]),
        mx.concatenate([p[2] for p in parts]),
    )


def _head_dim(model: Any) -> Optional[int]:
    """The model's attention head size from its ModelArgs, when it says (multimodal ones nest a text config)."""
    args = getattr(model, "args", None)
    args = getattr(args, "text_config", None) or args
    fields = args if isinstance(args, dict) else vars(args) if args is not None else {}
    head_dim, hidden, heads = (fields.get(k) for k in ("head_dim", "hidden_size", "num_attention_heads"))
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def make_cache(model: Any, kv: str) -> list[Any]:
    """The per-sequence caches a prompt of `model` is prefilled into, for KV setting `kv` ("f16", "q8", "q4").

    Quantized settings need every layer's own cache to be a plain `KVCache`: a rotating window, a state-space
    layer or a cache list has no quantized batched form here, and the ValueError names what the model uses so
    the caller can refuse the setting."""
    if kv not in KV_SETTINGS:
        raise ValueError(f"unknown KV cache setting {kv!r}; expected one of {', '.join(KV_SETTINGS)}")
    parts = getattr(model, "parts", None)  # a target stepped with its draft model: each keeps its own layers
    if parts is not None:
        return [c for part in parts for c in make_cache(part, kv)]
    caches = make_prompt_cache(model)
    if kv == "f16":
        return caches
    for i, c in enumerate(caches):
        # Exact type: subclasses (rope-shifted, rotating variants) carry state a quantized cache would drop.
        if type(c) is not KVCache:
            raise ValueError(
                f"a {kv} KV cache needs plain KVCache layers, but layer {i} of this model uses {type(c).__name__}"
            )
    head_dim = _head_dim(model)
    if head_dim is not None and head_dim % GROUP_SIZE:
        raise ValueError(f"a {kv} KV cache needs a head size divisible by {GROUP_SIZE}; this model's is {head_dim}")
    return [SequenceQuantizedKVCache(group_size=GROUP_SIZE, bits=KV_BITS[kv]) for _ in caches]


def quantized_per_token(cfg: dict[str, Any], kv: str, dtype_size: int) -> int:
    """bytes_per_token from an HF-style config.json (multimodal ones nest the language model's)."""
    text = cfg.get("text_config", cfg)
    layers = int(text.get("num_hidden_layers", 0) or 0)
    heads = int(text.get("num_attention_heads", 1) or 1)
    kv_heads = int(text.get("num_key_value_heads", heads) or heads)
    head_dim = int(text.get("head_dim") or (int(text.get("hidden_size", 0) or 0) // max(heads, 1)))
    return bytes_per_token(kv_heads, head_dim, layers, kv, dtype_size)


def bytes_per_token(kv_heads: int, head_dim: int, layers: int, kv: str, dtype_size: int = 2) -> int:
    """Bytes one token's keys and values take across all layers at setting `kv`; `dtype_size` is the model's
    activation dtype, which unquantized KV and the quantized scales and biases are stored in."""
    if kv not in KV_SETTINGS:
        raise ValueError(f"unknown KV cache setting {kv!r}; expected one of {', '.join(KV_SETTINGS)}")
    if kv == "f16":
        per_head = head_dim * dtype_size
    else:
        packed = math.ceil(head_dim * KV_BITS[kv] / 32) * 4  # bits packed into uint32 words
        per_head = packed + math.ceil(head_dim / GROUP_SIZE) * 2 * dtype_size  # a scale and a bias per group
    return 2 * layers * kv_heads * per_head  # keys and values
