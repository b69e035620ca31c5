"""Vision on the inference thread: an mlx-vlm model as the language model mlx_lm's BatchGenerator steps, its
vision tower run one image at a time between decode steps, and the projected features kept by content hash.

A vision prompt is prefilled like any other (in time slices, into a cache of its own), except that its chunks go
in as embeddings: text positions from the token embedding table, image positions from the image's features. When
only its last token is left it joins the model's one continuous batch beside text sequences. The Qwen-VL family
numbers positions in three dimensions (mRoPE): a prompt's positions come precomputed from the preparation stage,
and after the prompt a sequence's positions run `rope_delta` ahead of its cache length, which its batch cache
carries per row (ShiftedKVCache), so rows with different images decode in one batched pass.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlx_server.engine.loop.prefill import EncodeGate, PrefillJob
from mlx_server.engine.prepare.families import Features
from mlx_server.engine.prepare.vision import ImageInput


class ShiftedKVCache(KVCache):
    """A sequence's KV whose decode positions run `rope_shift` ahead of its length; merged into a batch, the
    shift moves into the batch cache's per-row offsets (which only rope reads: masks use the cache's own index)."""

    rope_shift: int = 0

    @classmethod
    def of(cls, cache: Any, shift: int) -> ShiftedKVCache:
        out = cls()
        out.keys, out.values, out.offset = cache.keys, cache.values, cache.offset
        out.rope_shift = shift
        return out

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKVCache:
        batch = BatchKVCache.merge(caches)
        batch.offset = batch.offset + mx.array([int(getattr(c, "rope_shift", 0)) for c in caches])
        return batch


class VisionLM:
    """What BatchGenerator and the prefill see of an mlx-vlm model: `model(inputs, cache=...)` → logits."""

    def __init__(self, vlm: Any, mrope: bool, features: Optional[Features] = None) -> None:
        self.vlm = vlm
        self.lm = vlm.language_model
        self.mrope = mrope
        self.features = features  # the family's own encoder, where mlx-vlm's misplaces features (LLaVA-NeXT)
        if hasattr(self.lm, "make_cache"):
            self.make_cache = self.lm.make_cache  # mlx_lm's make_prompt_cache asks for it by hasattr

    @property
    def layers(self) -> Any:
        return self.lm.layers

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        inputs_embeds: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
        **extra: Any,
    ) -> mx.array:
        kwargs: dict[str, Any] = dict(extra)
        if self.mrope:
            # Always explicit: the model's own position state belongs to one request at a time.
            kwargs["position_ids"] = positions if positions is not None else self._text_positions(inputs, cache)
        out = self.lm(inputs, inputs_embeds=inputs_embeds, cache=cache, **kwargs)
        return out.logits

    def _text_positions(self, inputs: mx.array, cache: Optional[list[Any]]) -> mx.array:
        batch, length = inputs.shape
        offset = cache[0].offset if cache else 0
        start = offset[:, None] if isinstance(offset, mx.array) else mx.full((batch, 1), offset)
        pos = start + mx.arange(length)[None]
        return mx.broadcast_to(pos[None], (3, batch, length))

    def embed_text(self, ids: mx.array) -> mx.array:
        return self.vlm.get_input_embeddings(ids, None).inputs_embeds

    def encode(self, image: ImageInput, image_token_id: int) -> ImageFeatures:
        """The image's projected features, one row per image token (run through the vision tower once)."""
        ids = mx.array(list(image.ids))[None]
        arrays = {k: mx.array(v) for k, v in image.arrays.items()}
        pixels = arrays.pop("pixel_values")
        if self.features is not None:
            features = ImageFeatures(self.features(self.vlm, pixels, arrays))
        else:
            out = self.vlm.get_input_embeddings(ids, pixels, **arrays)
            rows = mx.array(np.flatnonzero(np.asarray(image.ids) == image_token_id).astype(np.int32))
            deep = tuple(getattr(out, "deepstack_visual_embeds", None) or ())
            features = ImageFeatures(out.inputs_embeds[0][rows], deep)
        mx.eval([features.main, *features.deep])
        return features


@dataclass(frozen=True)
class ImageFeatures:
    """One image's projected features (a row per image token), and the per-layer features a deepstack family
    (Qwen3-VL) adds to the first decoder layers' hidden states at the image's positions."""

    main: mx.array
    deep: tuple[mx.array, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.main.nbytes) + sum(int(d.nbytes) for d in self.deep)


@dataclass
class FeatureCache:
    """Projected image features by image key (content hash + processor settings), least recently used first."""

    max_bytes: int
    entries: OrderedDict[str, ImageFeatures] = field(default_factory=OrderedDict)
    nbytes: int = 0
    encodes: int = 0  # vision tower runs (tests and /metrics read it)
    hits: int = 0

    def get(self, key: str) -> Optional[ImageFeatures]:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return found

    def put(self, key: str, features: ImageFeatures) -> None:
        if key in self.entries or features.nbytes > self.max_bytes:
            return
        self.entries[key] = features
        self.nbytes += features.nbytes
        self.trim(self.max_bytes)

    def trim(self, limit: int) -> None:
        while self.entries and self.nbytes > max(0, limit):
            _, dropped = self.entries.popitem(last=False)
            self.nbytes -= dropped.nbytes


@dataclass
class VisionPrefillJob(PrefillJob):
    """A vision prompt's prefill: a chunk that reaches an image waits until the image is encoded, which is a
    call of its own (at most one tower run per slice: the worker hides this job until the next step)."""

    inputs: Optional[VisionInputs] = None  # always set (a default only because PrefillJob's fields have them)
    features: dict[int, ImageFeatures] = field(default_factory=dict)  # image index → its features

    @property
    def vision(self) -> VisionInputs:
        assert self.inputs is not None
        return self.inputs

    @property
    def images(self) -> tuple[ImageInput, ...]:
        return self.vision.images

    @property
    def activation(self) -> int:
        """Bytes the tower's peak takes for its largest image (held while any is left to encode)."""
        return self.vision.activation

    def blocked(self) -> Optional[int]:
        """The image whose features the next token needs and does not have yet (None: it can run). A two-way
        prefix needs all of its images before its one pass."""
        reach = max(self.done, self.vision.prefix - 1)
        index = self.next_image(reach - self.done + 1)
        if index is None or self.images[index].positions[0] > reach:
            return None
        return index

    def ready(self, gate: EncodeGate) -> bool:
        if self.remaining <= 0:
            return False
        index = self.blocked()
        return index is None or gate.open or self.images[index].key in self.vision.feature_cache.entries

    def advance(self, model: Any, n: int, gate: Optional[EncodeGate] = None) -> int:
        """Encode the image the prompt has reached (a call of its own: returns 0 tokens), else prefill up to
        `n` tokens, stopping before the next image that still needs its encode."""
        index = self.blocked()
        if index is not None and not self.features_for(index):
            if gate is not None:
                if not gate.open:
                    return 0
                gate.open = False
            self.encode(index)
            return 0
        return self.run_tokens(max(n, self.vision.prefix - self.done))  # a two-way prefix goes in one pass

    def next_image(self, n: int) -> Optional[int]:
        """The first image not yet encoded whose features fall in the next `n` tokens (or before them)."""
        end = self.done + n
        for index, image in enumerate(self.images):
            if index not in self.features and image.positions and image.positions[0] < end:
                if image.positions[-1] >= self.done:
                    return index
        return None

    @property
    def encoding_left(self) -> bool:
        return any(i not in self.features for i, im in enumerate(self.images) if im.positions[-1] >= self.done)

    def features_for(self, index: int) -> bool:
        """Take the image's features from the cache if they are there; True when they were."""
        found = self.vision.feature_cache.get(self.images[index].key)
        if found is not None:
            self.features[index] = found
        return found is not None

    def encode(self, index: int) -> None:
        features = self.vision.lm.encode(self.images[index], self.vision.image_token_id)
        self.features[index] = features
        self.vision.feature_cache.encodes += 1
        self.vision.feature_cache.put(self.images[index].key, features)

    def run_tokens(self, n: int) -> int:
        """Prefill up to `n` tokens, stopping before an image whose features are not there yet."""
        blocked = self.next_image(n)
        if blocked is not None:
            n = min(n, self.images[blocked].positions[0] - self.done)
        if n <= 0:
            return 0
        lo, hi = self.done, self.done + n
        ids = mx.array(self.tokens[lo:hi])[None]
        embeds = self.vision.lm.embed_text(ids)
        rows: list[int] = []
        values: list[mx.array] = []
        deep: list[list[mx.array]] = []
        for index, image in enumerate(self.images):
            inside = [(k, p - lo) for k, p in enumerate(image.positions) if lo <= p < hi]
            if inside:
                rows.extend(p for _, p in inside)
                feats, span = self.features[index], slice(inside[0][0], inside[-1][0] + 1)
                values.append(feats.main[span])
                deep.append([layer[span] for layer in feats.deep])
        extra: dict[str, Any] = {}
        if lo < self.vision.prefix:
            extra["mask"] = prefix_mask(lo, hi, self.vision.prefix)
        if rows:
            flat = embeds[0]
            flat[mx.array(rows)] = mx.concatenate(values).astype(flat.dtype)
            embeds = flat[None]
            if any(deep):
                # Deepstack: each of the first layers adds its own features at the chunk's image rows.
                mask = np.zeros((1, n), dtype=bool)
                mask[0, rows] = True
                extra["visual_pos_masks"] = mx.array(mask)
                extra["deepstack_visual_embeds"] = [mx.concatenate(list(layer)) for layer in zip(*deep, strict=True)]
        positions = None
        mrope = self.vision.mrope
        if mrope is not None:
            positions = mx.array(mrope[:, lo:hi])[:, None, :]
        self.vision.lm(ids, cache=self.cache, inputs_embeds=embeds, positions=positions, **extra)
        mx.eval([c.state for c in self.cache])
        self.done += n
        self.chunks += 1
        return n


def prefix_mask(lo: int, hi: int, prefix: int) -> mx.array:
    """The attention mask of positions lo..hi-1 over 0..hi-1 when the first `prefix` attend to each other both
    ways (moondream2's BOS and image) and every later one causally; True where attention is allowed."""
    rows = np.arange(lo, hi)[:, None]
    cols = np.arange(hi)[None, :]
    allowed = (cols <= rows) | ((rows < prefix) & (cols < prefix))
    return mx.array(allowed[None, None])


@dataclass(frozen=True)
class VisionInputs:
    """What a vision prompt brings to its model's generate worker (kinds/vision.py makes it)."""

    lm: VisionLM
    images: tuple[ImageInput, ...]
    image_token_id: int
    feature_cache: FeatureCache
    mrope: Optional[np.ndarray] = None
    rope_delta: int = 0
    activation: int = 0
    prefix: int = 0  # the first `prefix` prompt tokens attend both ways: prefilled in one pass (VisionPrefillJob)

    def key(self, tokens: list[int]) -> list[int]:
        """The prompt as the prompt cache matches it: each image's tokens replaced by a value of its content
        hash (negative, so never a real token), so the same placeholders with another image never match."""
        out = list(tokens)
        for image in self.images:
            salt = -1 - int(image.digest[:15], 16)
            for p in image.positions:
                out[p] = salt
        if self.prefix:
            # A two-way prefix's KV depends on all of it (BOS attends to the image): its BOS must match only
            # prompts with the same image, so it carries the image's value too.
            out[: self.prefix] = [out[self.images[0].positions[0]]] * self.prefix
        return out

    def job(self, base: PrefillJob) -> VisionPrefillJob:
        """`base` (the prompt's tokens, cache and cached prefix) as this prompt's vision prefill."""
        return VisionPrefillJob(**{f: getattr(base, f) for f in base.__dataclass_fields__}, inputs=self)


__all__ = ["FeatureCache", "ShiftedKVCache", "VisionInputs", "VisionLM", "VisionPrefillJob", "prefix_mask"]
