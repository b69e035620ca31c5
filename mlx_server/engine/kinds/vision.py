"""Vision: a generation with images. Its images are decoded, checked, processed and expanded into the family's
image tokens off the thread (engine/prepare/vision.py); on the thread its images are encoded one per prefill
slice, their features fill the prompt's image positions, and it decodes in its model's one continuous batch
beside text (engine/model/vision.py). Projected features are kept by content hash within the budget."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional

from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.events import Sink
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.kinds.base import Kind
from mlx_server.engine.loop.budget import kv_bound
from mlx_server.engine.loop.jobs import Admitting, Outcome, Worker
from mlx_server.engine.model.loader import Weights
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.engine.model.vision import FeatureCache, VisionInputs, VisionLM, VisionPrefillJob
from mlx_server.engine.prepare.stage import ModelFiles, Prepared, Preparer
from mlx_server.engine.prepare.vision import ImageInput, VisionPrompt, has_images

NAME = "vision"


@dataclass(frozen=True)
class VisionJob(Prepared):
    prompt: Optional[VisionPrompt] = None
    reserve: int = 0  # KV (and the tower's peak) to reserve beside the weights when its model must be loaded first
    activation: int = 0  # the vision tower's activation peak for this request's largest image

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        unsupported = BadRequest(f'"{self.request.model}" does not support images')
        return loop.run_on_model(self, NAME, unsupported, self.reserve, load_seconds, self.request.keep_alive)

    def wire(self) -> VisionJob:
        return replace(self, grammar=[])

    def for_rank(self, preparer: Preparer) -> VisionJob:
        return preparer.with_grammar(self)


def tower_activation(files: ModelFiles, image: ImageInput) -> int:
    """Bytes the vision tower's forward pass peaks at for `image` as its processor sized it (max_pixels bounds
    it): float32 hidden states and MLP buffers per patch, and attention scores per head over at most 1,024 keys
    at a time. An estimate, reserved before the tower runs, so a large image waits or is refused instead of
    exhausting memory."""
    vision = files.config.get("vision_config", {})
    hidden = int(vision.get("hidden_size", 1024) or 1024)
    heads = int(vision.get("num_attention_heads", vision.get("num_heads", 16)) or 16)
    patch = int(vision.get("patch_size", 14) or 14)
    pixels = image.arrays["pixel_values"].size // 3  # what the tower sees, tiles and all
    patches = max(1, pixels // (patch * patch))
    return 4 * patches * (16 * hidden + heads * min(patches, 1024))


def prepare(preparer: Preparer, request: GenerateRequest) -> VisionJob:
    prepared, prompt = preparer.prepare_vision(request)
    files = preparer.files(request.model)
    activation = max((tower_activation(files, image) for image in prompt.images), default=0)
    return VisionJob(
        **{f.name: getattr(prepared, f.name) for f in fields(prepared)},
        prompt=prompt,
        reserve=kv_bound([prepared.kv_tokens], files.kv_per_token) + activation,
        activation=activation,
    )


class VisionWorker:
    """Implements engine.loop.jobs.Worker for `VisionJob`s on a vision model: admits them into the model's
    generate worker (whose batch they decode in) with their images, and holds the image feature cache."""

    def __init__(self, name: str, generate: GenerateWorker, lm: VisionLM, image_token_id: int, cache_bytes: int):
        self.name = name
        self.generate = generate
        self.lm = lm
        self.image_token_id = image_token_id
        self.features = FeatureCache(max_bytes=cache_bytes)

    def _encoding(self) -> list[VisionPrefillJob]:
        jobs = [s.job for s in self.generate.prefilling.values()]
        return [j for j in jobs if isinstance(j, VisionPrefillJob) and j.encoding_left]

    @property
    def reserved(self) -> int:
        return sum(j.activation for j in self._encoding())

    @property
    def stored(self) -> int:
        return self.features.nbytes

    def trim(self, limit: int) -> None:
        self.features.trim(limit)

    def needed(self, job: VisionJob) -> int:
        return self.generate.needed(job) + job.activation

    def footprint(self, job: VisionJob) -> int:
        return self.generate.footprint(job) + job.activation

    def add(self, job: VisionJob, sink: Sink, load_seconds: float) -> None:
        prompt = job.prompt
        assert prompt is not None
        inputs = VisionInputs(
            lm=self.lm,
            images=prompt.images,
            image_token_id=self.image_token_id,
            feature_cache=self.features,
            mrope=prompt.mrope,
            rope_delta=prompt.rope_delta,
            activation=job.activation,
            prefix=prompt.prefix,
        )
        self.generate.add(job, sink, load_seconds, vision=inputs)

    def has_work(self) -> bool:
        return False  # its requests run in the generate worker

    @property
    def joining(self) -> bool:
        return False

    def step(self, now: float) -> int:
        return 0

    def prefill_jobs(self) -> list[Any]:
        return []

    def prefill(self, job: Any, n: int) -> int:
        return 0

    def fail_prefill(self, job: Any, exc: Exception) -> None:
        return None

    def cancel(self, request_id: int) -> bool:
        return False

    def fail_all(self, error: MlxServerError) -> None:
        return None

    def close(self) -> None:
        self.features.trim(0)
        self.lm = None  # type: ignore[assignment]


def worker(weights: Weights, built: Mapping[str, Worker]) -> Optional[VisionWorker]:
    generate = built.get("generate")
    vision = weights.files.vision
    if weights.vlm is None or vision is None or not isinstance(generate, GenerateWorker):
        return None
    return VisionWorker(
        weights.name, generate, weights.model, vision.image_token_id, max(0, weights.prompt_cache_bytes // 4)
    )


KIND = Kind(NAME, (GenerateRequest,), prepare, worker=worker, accepts=has_images)

__all__ = ["KIND", "VisionJob", "VisionWorker", "tower_activation"]
