"""A vision request's prompt: images placed by the chat template, run through the family's image processor and
expanded into the family's image tokens — all in numpy and Python, in the preparation stage.

mlx-vlm's processors do this too, but they hand back MLX arrays (and LLaVA's passes `padding=True` to
transformers' CLIP image processor, which rejects it): only the inference thread may make MLX arrays here, so
each family's image processor is called directly for numpy arrays, and the image tokens are expanded the way
that family's processor expands them. The result says where every image's features go in the prompt (the
inference thread fills those positions with the vision tower's output) and, for the Qwen-VL family, every
token's multimodal rope position.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.prepare.families import FAMILIES, Family
from mlx_server.engine.prepare.images import DecodedImage

TAG = re.compile(r"\[img(?:-(\d+))?\]")  # Ollama's placement tags: the message's next image, or image N


def needs_mlx_vlm(name: str, exc: Exception) -> str:
    return f"model \"{name}\" needs mlx-vlm: pip install 'mlx-server[vision]' ({exc})"


def family_of(config: dict[str, Any]) -> Optional[Family]:
    return FAMILIES.get(str(config.get("model_type", "")))


def is_vision_config(config: dict[str, Any]) -> bool:
    """A model that takes images: a vision tower in its config.json (mlx-vlm's own test)."""
    return isinstance(config.get("vision_config"), dict)


@dataclass(frozen=True)
class ImageInput:
    """One image, ready for the vision tower: numpy inputs and where its features go."""

    digest: str
    key: str  # the image feature cache key: content hash + the processor settings that shaped its inputs
    arrays: dict[str, np.ndarray]  # pixel_values and the family's extras (image_grid_thw, pixel_attention_mask)
    ids: tuple[int, ...]  # its placeholder tokens on their own: what its features are encoded from
    positions: tuple[int, ...] = ()  # prompt positions its features fill, in order

    @property
    def tokens(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class VisionPrompt:
    tokens: list[int]
    images: tuple[ImageInput, ...]
    mrope: Optional[np.ndarray] = None  # (3, len(tokens)) positions, Qwen-VL only
    rope_delta: int = 0  # decode positions run this far ahead of the cache length (Qwen-VL)
    prefix: int = 0  # the first `prefix` tokens attend to each other both ways (moondream2: BOS and its image)


@dataclass
class VisionProcessor:
    """A model's processor and family, read once per model in the preparation stage (no MLX arrays are made)."""

    family: Family
    processor: Any
    config: dict[str, Any]

    @classmethod
    def load(cls, path: Path, config: dict[str, Any]) -> VisionProcessor:
        from mlx_vlm.utils import get_model_and_args, load_processor  # deferred: mlx-vlm is the `vision` extra

        family = family_of(config)
        if family is None:
            raise ValueError(
                f"model_type {config.get('model_type')!r} is not a vision family this server expands images for "
                f"(supported: {', '.join(sorted(FAMILIES))})"
            )
        # Importing the family's mlx-vlm module registers its own (numpy) processor with AutoProcessor (Qwen-VL);
        # without it transformers' torch-backed one is picked. mlx_vlm.load imports it first, and so must this.
        get_model_and_args(config)
        processor = family.load(path) if family.load is not None else load_processor(path, add_detokenizer=False)
        return cls(family, processor, config)

    @property
    def mrope(self) -> bool:
        return self.family.positions is not None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_token(self) -> str:
        return str(self.processor.image_token)

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        known = cfg.get("image_token_id", cfg.get("image_token_index", self.family.image_token_id))
        return int(known) if known is not None else int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @property
    def marker(self) -> str:
        """What the chat template writes for one image part (the expansion replaces it)."""
        return self.family.marker(self.processor)

    def settings(self) -> str:
        """The image processor settings that decide the tower's input (part of the feature cache key)."""
        ip = getattr(self.processor, "image_processor", self.processor)  # moondream2's processor is its own
        keys = (
            *("size", "crop_size", "min_pixels", "max_pixels", "patch_size", "merge_size", "do_image_splitting"),
            *("max_crops", "overlap_margin"),
        )
        picked = {k: getattr(ip, k, None) for k in keys}
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def process(self, image: DecodedImage) -> tuple[str, dict[str, np.ndarray]]:
        """The image's expansion text and its numpy inputs."""
        return self.family.process(self.processor, image.image)

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        # The family's processor tokenizes with special tokens; a template that writes BOS itself gets no second.
        return list(tok.encode(text, add_special_tokens=not (bos and text.startswith(bos))))


def request_images(req: GenerateRequest) -> list[str]:
    """Every image of the request, in order (Ollama's [img-N] counts across the whole request)."""
    if req.messages is None:
        return list(req.images or [])
    return [image for m in req.messages for image in (m.images or [])]


def has_images(req: GenerateRequest) -> bool:
    return bool(request_images(req))


def template_messages(req: GenerateRequest, total: int) -> tuple[list[dict[str, Any]], list[int]]:
    """The chat messages with content parts where images go, and the request's image indices in the order the
    parts appear. `[img]` takes the message's next image, `[img-N]` image N; images not placed by a tag go
    before their message's text (Ollama's and the HF templates' usual order)."""
    messages = req.messages
    if messages is None:
        from mlx_server.contract.requests import ChatMessage

        messages = [ChatMessage(role="user", content=req.prompt or "", images=req.images)]
    placed = {int(m.group(1)) for msg in messages for m in TAG.finditer(msg.content) if m.group(1) is not None}
    for n in placed:
        if n >= total:
            raise BadRequest(f"[img-{n}] names an image the request does not have ({total} sent)")
    out: list[dict[str, Any]] = []
    order: list[int] = []
    first = 0
    for msg in messages:
        own = list(range(first, first + len(msg.images or [])))
        first += len(own)
        entry = msg.to_template()
        if not own and not TAG.search(msg.content):
            out.append(entry)
            continue
        free = [i for i in own if i not in placed]
        parts: list[dict[str, Any]] = []
        tagged: list[int] = []
        pos = 0
        for m in TAG.finditer(msg.content):
            if m.start() > pos:
                parts.append({"type": "text", "text": msg.content[pos : m.start()]})
            if m.group(1) is not None:
                index = int(m.group(1))
            elif free:
                index = free.pop(0)
            else:
                raise BadRequest("an [img] tag has no image left to place in its message")
            parts.append({"type": "image"})
            tagged.append(index)
            pos = m.end()
        if pos < len(msg.content):
            parts.append({"type": "text", "text": msg.content[pos:]})
        lead = [{"type": "image"} for _ in free]
        order.extend([*free, *tagged])
        entry["content"] = [*lead, *parts]
        out.append(entry)
    return out, order


def raw_text(req: GenerateRequest, marker: str, total: int) -> tuple[str, list[int]]:
    """A raw prompt with its images: each tag becomes the family's image marker, untagged images lead."""
    prompt = req.prompt or ""
    order: list[int] = []
    free = list(range(total))

    def place(m: re.Match[str]) -> str:
        index = int(m.group(1)) if m.group(1) is not None else (free[0] if free else -1)
        if not 0 <= index < total:
            raise BadRequest("an image tag names an image the request does not have")
        if index in free:
            free.remove(index)
        order.append(index)
        return marker

    body = TAG.sub(place, prompt)
    return marker * len(free) + body, [*free, *order]


def image_key(image: DecodedImage, settings: str) -> str:
    """The image feature cache key: the image's content hash and the processor settings that shaped its inputs."""
    return f"{image.digest}:{settings}"


def expand(
    text: str, order: Sequence[int], decoded: Sequence[DecodedImage], vp: VisionProcessor
) -> tuple[list[int], list[ImageInput]]:
    """Replace each image marker of the rendered prompt with its image's tokens; tokenize; find the positions."""
    pieces = text.split(vp.marker)
    if len(pieces) - 1 != len(order):
        raise BadRequest(
            f"the chat template placed {len(pieces) - 1} image(s) but the request has {len(order)}; "
            "this model's template may not take images in these messages"
        )
    settings = vp.settings()
    inputs: list[ImageInput] = []
    body = pieces[0]
    for index, piece in zip(order, pieces[1:], strict=True):
        image = decoded[index]
        expansion, arrays = vp.process(image)
        inputs.append(
            ImageInput(
                digest=image.digest,
                key=image_key(image, settings),
                arrays=arrays,
                ids=tuple(_plain(vp, expansion)),
            )
        )
        body += expansion + piece
    tokens = vp.encode(body)
    image_id = vp.image_token_id
    slots = [i for i, t in enumerate(tokens) if t == image_id]
    placed: list[ImageInput] = []
    at = 0
    for entry in inputs:
        n = sum(1 for t in entry.ids if t == image_id)
        placed.append(replace(entry, positions=tuple(slots[at : at + n])))
        at += n
    if at != len(slots):
        raise BadRequest("the prompt's text holds image tokens of its own; remove them and send the image")
    return tokens, placed


def _plain(vp: VisionProcessor, text: str) -> list[int]:
    return list(vp.tokenizer.encode(text, add_special_tokens=False))


def vision_prompt(
    req: GenerateRequest,
    vp: VisionProcessor,
    decoded: Sequence[DecodedImage],
    render_text: Callable[[list[dict[str, Any]]], str],
) -> VisionPrompt:
    """Template, expand and tokenize a request with images (raw prompts skip the template)."""
    total = len(decoded)
    if vp.family.build is not None:
        return built_prompt(req, vp, decoded)
    if req.prompt is not None and req.raw:
        text, order = raw_text(req, vp.marker, total)
    else:
        messages, order = template_messages(req, total)
        text = render_text(messages)
    tokens, images = expand(text, order, decoded, vp)
    return VisionPrompt(tokens, tuple(images))


def built_prompt(req: GenerateRequest, vp: VisionProcessor, decoded: Sequence[DecodedImage]) -> VisionPrompt:
    """The prompt of a family that builds its own (moondream2): the request's turns as text, images by the family."""
    assert vp.family.build is not None
    raw: Optional[str] = None
    turns: list[tuple[str, str]] = []
    if req.prompt is not None and req.raw:
        raw = TAG.sub("", req.prompt)
    else:
        messages = req.messages if req.messages is not None else []
        turns = [(m.role, TAG.sub("", m.content)) for m in messages] or [("user", TAG.sub("", req.prompt or ""))]
        if req.system is not None:  # as the template path: the request's system prompt replaces the messages'
            turns = [("system", req.system), *(t for t in turns if t[0] != "system")]
    try:
        tokens, slots = vp.family.build(vp.processor, turns, raw, len(decoded))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    settings = vp.settings()
    images = []
    for image, positions in zip(decoded, slots, strict=True):
        _, arrays = vp.process(image)
        ids = tuple(tokens[p] for p in positions)
        key = image_key(image, settings)
        images.append(ImageInput(digest=image.digest, key=key, arrays=arrays, ids=ids, positions=positions))
    prefix = 1 + max(images[-1].positions) if images and vp.family.prefix else 0
    if prefix >= len(tokens):  # the prompt's last pass is its own: a two-way prefix needs a token after it
        raise BadRequest("this model needs some text after the image")
    return VisionPrompt(tokens, tuple(images), prefix=prefix)


def with_positions(prompt: VisionPrompt, vp: VisionProcessor) -> VisionPrompt:
    """The prompt's rope positions where the family needs them (after fitting, so they match the kept tokens)."""
    if vp.family.positions is None or not prompt.images:
        return prompt
    placed = [(image.positions[0], image.arrays) for image in prompt.images]
    positions, delta = vp.family.positions(vp.processor, prompt.tokens, placed)
    return replace(prompt, mrope=positions, rope_delta=delta)


def cut(prompt: VisionPrompt, dropped: int) -> VisionPrompt:
    """The prompt with its first `dropped` tokens gone (fitted to the context); an image it would cut is a 400."""
    if not dropped:
        return prompt
    if any(p < dropped for image in prompt.images for p in image.positions):
        raise BadRequest(
            f"the prompt with its images is longer than the context by {dropped} tokens; "
            "send fewer or smaller images, a shorter history, or a larger num_ctx"
        )
    if prompt.prefix:
        raise BadRequest(
            f"the prompt is longer than the context by {dropped} tokens and this model's image must stay at its "
            "start; send a shorter conversation or a larger num_ctx"
        )
    images = tuple(replace(i, positions=tuple(p - dropped for p in i.positions)) for i in prompt.images)
    return VisionPrompt(prompt.tokens[dropped:], images)


__all__ = [
    "ImageInput",
    "VisionProcessor",
    "VisionPrompt",
    "cut",
    "expand",
    "family_of",
    "has_images",
    "is_vision_config",
    "needs_mlx_vlm",
    "request_images",
    "template_messages",
    "vision_prompt",
    "with_positions",
]
