"""Turns a configured model name into a resident `Model` (mlx_lm load in slices) and back.

The preparation stage has already found (and, for a GGUF, imported) the model's files and loaded its tokenizer,
so a load here only evaluates weights, a few at a time between decode steps. Then every registered kind
(engine/kinds/) is offered the loaded `Weights` and makes its worker if it can serve the model. Footprints are
weights on disk; KV is reserved per request at admission (engine/loop/budget.py), never guessed per model.
"""

from __future__ import annotations

import gc
import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_server.config.load import Config
from mlx_server.config.tree import PROMPT_LOOKUP
from mlx_server.contract.errors import ModelLoadFailed
from mlx_server.engine.distributed.lockstep import Lockstep, all_failed
from mlx_server.engine.loop.jobs import Model, Worker
from mlx_server.engine.model.kvquant import make_cache, quantized_per_token
from mlx_server.engine.model.speculative import Drafting, PairedModel, trimmable
from mlx_server.engine.prepare.stage import ModelFiles, Preparer
from mlx_server.engine.prepare.vision import needs_mlx_vlm
from mlx_server.models.info import kv_bytes_per_token

log = logging.getLogger("mlx_server.loader")


def _leaves(model: Any) -> list[Any]:
    """The model's parameter arrays (mlx's stubs type tree_flatten's result loosely)."""
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return [array for _, array in flat]


@dataclass
class Weights:
    """A loaded model as the kinds see it when they make their workers."""

    name: str
    files: ModelFiles
    path: Path
    config: dict[str, Any]
    context_length: int
    model: Any = None  # the mlx_lm model (a VisionLM over an mlx-vlm model); None for an embedding model
    vlm: Any = None  # the mlx-vlm model of a vision model: its vision tower and projector
    embedder: Any = None  # the Embedder of an embedding model
    kv_per_token: int = 0  # bytes of KV per token of context on this rank
    max_batch: int = 16
    prompt_cache_bytes: int = 0
    kv_cache: str = "f16"  # how its KV is stored: f16 (the weights' float type), q8 or q4
    drafting: Optional[Drafting] = None  # speculative decoding
    draft_model: Any = None  # the mlx_lm draft model, when drafting with one
    draft: str = ""  # what drafts: the draft model's name or "prompt-lookup"


# Given the loaded weights and the workers made so far (a kind may build on an earlier kind's worker); None: this
# kind cannot serve the model.
WorkerFactory = Callable[[Weights, Mapping[str, Worker]], Optional[Worker]]


def _load_vision(files: ModelFiles) -> tuple[Any, Any, dict[str, Any]]:
    """An mlx-vlm model (lazy: weights are evaluated in slices after), and its language model as BatchGenerator
    steps it."""
    try:
        from mlx_vlm.utils import load_model as load_vlm
    except ImportError as exc:
        raise ModelLoadFailed(needs_mlx_vlm(files.name, exc)) from exc
    from mlx_server.engine.model.vision import VisionLM

    vlm = load_vlm(files.path, lazy=True)
    assert files.vision is not None
    return vlm, VisionLM(vlm, mrope=files.vision.mrope, features=files.vision.family.features), files.config


class ModelLoader:
    def __init__(
        self,
        config: Config,
        preparer: Preparer,
        factories: Mapping[str, WorkerFactory],
        *,
        slice_seconds: float = 0.05,
        lockstep: Optional[Lockstep] = None,
    ) -> None:
        self.config = config
        self.factories = factories  # kind → what makes its worker (engine/kinds/)
        self.lockstep = lockstep
        self.preparer = preparer
        self.max_batch = config.server.max_concurrent
        self.slice_seconds = slice_seconds

    def _files(self, name: str) -> Generator[None, None, ModelFiles]:
        """The model's files from the preparation stage, waiting in slices if they are still being made."""
        future: Future[ModelFiles] = self.preparer.executor.submit(self.preparer.files, name)
        while True:
            try:
                return future.result(timeout=self.slice_seconds)
            except FuturesTimeout:
                yield

    def estimate(self, name: str) -> int:
        """Bytes of weights (this rank's share, distributed); only called once the preparation stage saw the model."""
        files = self.preparer.files(name)
        if self.lockstep is not None and files.embedding is None:
            return -(-files.weights // self.lockstep.size)
        return files.weights

    def load(self, name: str) -> Generator[None, None, Model] | Model:
        """In slices (a generator), or distributed in one go: every rank loads in the same iteration."""
        if self.lockstep is not None:
            return self._load_sharded(name)
        return self._load_slices(name)

    def split(self, name: str) -> tuple[str, Optional[str]]:
        """How `name` is split across the group ("tensor", "pipeline", or "whole" for embedders), and why it cannot
        be (None when it can). Reads config.json and mlx_lm's classes only: no weights, no MLX work."""
        import sys

        from mlx_lm.models.pipeline import PipelineMixin
        from mlx_lm.utils import _get_classes  # mlx_lm's own model_type → class mapping (mlx-lm is pinned)

        files = self.preparer.files(name)
        if files.embedding is not None:
            return "whole", None
        model_class = _get_classes(files.config)[0]
        module = vars(sys.modules[model_class.__module__]).values()
        can = {
            "tensor": hasattr(model_class, "shard"),
            "pipeline": any(isinstance(v, type) and issubclass(v, PipelineMixin) for v in module),
        }
        wanted = self.config.models[name].parallel
        method = wanted if wanted != "auto" else ("tensor" if can["tensor"] else "pipeline")
        if can[method]:
            return method, None
        what = {"tensor": "a tensor-parallel shard()", "pipeline": "pipeline()"}
        return method, (
            f'model "{name}" ({files.config.get("model_type")}) cannot be split across ranks: mlx_lm '
            f"has no {what[method] if wanted != 'auto' else 'shard() or pipeline()'} for this architecture"
        )

    def _load_sharded(self, name: str) -> Model:
        """Tensor parallel through mlx_lm's `Model.shard()`, else pipeline through its `model.pipeline()` (as
        mlx_lm's `sharded_load` chooses); every rank reports success before any goes on, so one rank's failure fails
        the load on all of them instead of leaving the others waiting."""
        from mlx_lm.utils import load_model

        ls = self.lockstep
        assert ls is not None
        files = self.preparer.files(name)
        if files.embedding is not None:
            return self._load_embedder(name, files)  # small: a whole copy on every rank
        if files.vision is not None:
            raise ModelLoadFailed(f'model "{name}" is a vision model: vision models are not split across ranks')
        method, problem = self.split(name)
        if problem is not None:
            raise ModelLoadFailed(problem)  # the same verdict on every rank, from the same config.json
        ls.loading = True
        error: Optional[ModelLoadFailed] = None
        try:
            model, cfg = load_model(files.path, lazy=True, strict=False)
            if method == "tensor":
                model.shard(ls.group)
            else:
                model.model.pipeline(ls.group)  # this rank keeps its slice of the layers (rank 0 the last ones)
            mx.eval(model.parameters())
        except ModelLoadFailed as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = ModelLoadFailed(f'failed to load model "{name}" on rank {ls.rank}: {exc}')
        finally:
            failed = all_failed(ls.group, error is not None)
            ls.loading = False
        if error is not None:
            raise error
        if failed:
            raise ModelLoadFailed(f'failed to load model "{name}" on {failed} other rank(s): see their logs')
        dtype = next((a.dtype for a in _leaves(model) if mx.issubdtype(a.dtype, mx.floating)), None)
        if method == "tensor":  # a rank holds its share of the heads
            return self._runner(name, files, model, cfg, dtype, shards=ls.size, split=method, kv_share=(1, ls.size))
        # Pipeline: a rank holds the KV of its own layers, at most ceil(layers / ranks) of them. Its prompt caches
        # would be as uneven, and the LRU trims them by bytes, so ranks would keep (and find) different prefixes:
        # no stored prompt caches for a pipelined model.
        layers = int(cfg.get("num_hidden_layers") or len(model.layers) or 1)
        return self._runner(
            name,
            files,
            model,
            cfg,
            dtype,
            shards=ls.size,
            split=method,
            kv_share=(-(-layers // ls.size), layers),
            prompt_cache_bytes=0,
        )

    def _load_slices(self, name: str) -> Generator[None, None, Model]:
        """A load in slices: weights are evaluated a few at a time, yielding so other models keep decoding."""
        from mlx_lm.utils import load_model  # deferred: importing mlx_lm pulls in transformers

        files = yield from self._files(name)
        if files.embedding is not None:
            return self._load_embedder(name, files)
        vlm = draft = None
        try:
            if files.vision is not None:
                vlm, model, cfg = _load_vision(files)
            else:
                model, cfg = load_model(files.path, lazy=True)
            if files.draft is not None:
                draft, _ = load_model(files.draft.path, lazy=True)
            yield
            deadline = time.perf_counter() + self.slice_seconds
            dtype = None
            # The language model's weights first: its float type is the KV cache's (a tower may be float32).
            if vlm is None:
                leaves = _leaves(model)
            else:
                leaves = _leaves(vlm.language_model)
                seen = {id(a) for a in leaves}
                leaves += [a for a in _leaves(vlm) if id(a) not in seen]  # then the tower and projector
            if draft is not None:
                leaves += _leaves(draft)
            for array in leaves:
                mx.eval(array)
                if dtype is None and mx.issubdtype(array.dtype, mx.floating):
                    dtype = array.dtype  # activations, and so the KV cache, take the weights' float type
                if time.perf_counter() >= deadline:
                    yield
                    deadline = time.perf_counter() + self.slice_seconds
        except ModelLoadFailed:
            raise
        except Exception as exc:
            raise ModelLoadFailed(f'failed to load model "{name}" from {files.path}: {exc}') from exc
        return self._runner(name, files, model, cfg, dtype, vlm=vlm, draft=draft)

    def _runner(
        self,
        name: str,
        files: ModelFiles,
        model: Any,
        cfg: dict[str, Any],
        dtype: Any,
        shards: int = 1,
        split: str = "",
        kv_share: tuple[int, int] = (1, 1),
        prompt_cache_bytes: Optional[int] = None,
        vlm: Any = None,
        draft: Any = None,
    ) -> Model:
        drafting = self._drafting(name, model, draft, files)
        if drafting is None:
            draft = None
        kv = self._kv_setting(name, model if draft is None else PairedModel(model, draft), files)
        size = dtype.size if dtype is not None else 2

        def per_token(c: dict[str, Any]) -> int:
            # modelinfo counts 2 bytes per element; scale to the real float type.
            return kv_bytes_per_token(c) // 2 * size if kv == "f16" else quantized_per_token(c, kv, size)

        total = per_token(cfg) + (per_token(files.draft.config) if draft is not None and files.draft else 0)
        kv_per_token = -(-total * kv_share[0] // kv_share[1])  # this rank's share, rounded up
        cache_bytes = self.config.server.prompt_cache_bytes if prompt_cache_bytes is None else prompt_cache_bytes
        return self._model(
            Weights(
                name,
                files,
                files.path,
                cfg,
                files.context_length,
                model=model,
                vlm=vlm,
                kv_per_token=kv_per_token,
                max_batch=self.max_batch,
                prompt_cache_bytes=cache_bytes,
                kv_cache=kv,
                drafting=drafting,
                draft_model=draft,
                draft=(files.draft.name if files.draft is not None else PROMPT_LOOKUP) if drafting else "",
            ),
            shards,
            split,
        )

    def _drafting(self, name: str, model: Any, draft: Any, files: ModelFiles) -> Optional[Drafting]:
        """The model's speculative decoding (models.yaml's `draft`), or None with the reason logged where it cannot
        be used: split across ranks, a vision model, or caches that cannot drop rejected drafts row by row."""
        cfg = self.config.models[name]
        if cfg.draft is None:
            return None
        why = None
        if self.lockstep is not None:
            why = "not available when serving distributed"
        elif files.vision is not None:
            why = "not available for vision models"
        else:
            why = trimmable(model) or (trimmable(draft) if draft is not None else None)
        if why is not None:
            log.warning("model %s: speculative decoding (draft %s) is off: %s", name, cfg.draft, why)
            return None
        vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or len(files.tokenizer))
        return Drafting(cfg.num_draft, paired=draft is not None, vocab=vocab)

    def _kv_setting(self, name: str, model: Any, files: ModelFiles) -> str:
        """The model's KV cache setting (models.yaml's, else the server's); a model whose caches have no quantized
        batched form here (rotating windows, state-space layers, an mRoPE vision model's shifted rows) keeps f16,
        as Ollama falls back when its quantized cache cannot be used, and says so."""
        wanted = self.config.models[name].kv_cache or self.config.server.kv_cache
        if wanted == "f16":
            return wanted
        if files.vision is not None and files.vision.mrope:
            log.warning("model %s: kv_cache %s is not available for mRoPE vision models; using f16", name, wanted)
            return "f16"
        if files.vision is not None and not files.vision.family.quantized_kv:
            family = files.vision.family.name
            log.warning("model %s: kv_cache %s is not available for %s models; using f16", name, wanted, family)
            return "f16"
        try:
            make_cache(model, wanted)
        except ValueError as exc:
            log.warning("model %s: kv_cache %s is not available (%s); using f16", name, wanted, exc)
            return "f16"
        return wanted

    def _load_embedder(self, name: str, files: ModelFiles) -> Model:
        """Embedding models are small (tens to hundreds of MB): loaded in one go."""
        from mlx_server.engine.model.embedders import load_embedder

        try:
            embedder = load_embedder(files.path, kind=self.config.models[name].kind)
        except Exception as exc:
            what = "rerank" if files.rerank is not None else "embedding"
            raise ModelLoadFailed(f'failed to load {what} model "{name}" from {files.path}: {exc}') from exc
        # kv_per_token is in kv_bound's units (it doubles them), so the embed worker reserves twice it per token.
        return self._model(
            Weights(
                name,
                files,
                files.path,
                files.config,
                embedder.max_length,
                embedder=embedder,
                kv_per_token=2 * files.kv_per_token,
                max_batch=self.max_batch,
            )
        )

    def _model(self, weights: Weights, shards: int = 1, split: str = "") -> Model:
        workers: dict[str, Worker] = {}
        for kind, make in self.factories.items():
            worker = make(weights, workers)
            if worker is not None:
                workers[kind] = worker
        return Model(
            weights.name,
            workers,
            weights.context_length,
            shards=shards,
            split=split,
            resources=weights,
            kv_cache=weights.kv_cache,
            kv_per_token=weights.kv_per_token if weights.model is not None else 0,
            draft=weights.draft,
        )

    def unload(self, loaded: Model) -> None:
        loaded.close()
        loaded.resources = None
        del loaded
        # Drop every reference first, then let MLX return the buffers, so active memory really falls.
        gc.collect()
        mx.clear_cache()
