"""Turns a configured model name into a ModelRunner: locate weights, import GGUF once, mlx_lm.load, and back.

Also estimates a model's footprint before loading (weights on disk + a KV reserve for its context length), so
the pool can refuse or evict before MLX ever allocates.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_server.config import Config
from mlx_server.engine.runner import ModelRunner
from mlx_server.errors import ModelLoadFailed, ModelNotFound
from mlx_server.modelinfo import kv_bytes_per_token, native_context_length
from mlx_server.sources import Located, locate, weights_size

log = logging.getLogger("mlx_server.loader")


@dataclass
class LoadedModel:
    runner: ModelRunner
    path: Path
    config: dict[str, Any]


class ModelLoader:
    def __init__(self, config: Config, *, max_batch: Optional[int] = None, slice_seconds: float = 0.05) -> None:
        self.config = config
        self.max_batch = max_batch or config.server.max_concurrent
        self.slice_seconds = slice_seconds
        self._config_dir = config.path.parent if config.path else None
        # Tokenizers load in Python (no MLX), so they can load beside the inference thread.
        self._tokenizers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-load")

    def locate(self, name: str) -> Located:
        model = self.config.models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return locate(model, self._config_dir)

    def model_dir(self, name: str) -> Path:
        found = self.locate(name)
        if not found.present:
            raise ModelNotFound(name, found.hint)
        assert found.path is not None
        if found.kind in ("gguf", "package"):
            from mlx_server.engine.gguf_import import import_gguf  # deferred: gguf parsing is only for these

            try:
                return import_gguf(found.path, self.config.server.cache_dir)
            except Exception as exc:
                raise ModelLoadFailed(f"failed to import GGUF for model \"{name}\": {exc}") from exc
        return found.path

    def context_length(self, name: str, cfg: dict[str, Any]) -> int:
        configured = self.config.models[name].context_length
        native = native_context_length(cfg)
        return min(configured, native) if configured else native

    def estimate(self, name: str) -> int:
        path = self.model_dir(name)
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadFailed(f"model \"{name}\" has an unreadable config.json: {exc}") from None
        weights = weights_size(path)
        return weights + kv_bytes_per_token(cfg) * self.context_length(name, cfg)

    def load(self, name: str) -> Generator[None, None, LoadedModel]:
        """A load in slices: weights are evaluated a few at a time, yielding so other models keep decoding."""
        from mlx_lm.utils import load_model, load_tokenizer  # deferred: importing mlx_lm pulls in transformers

        path = self.model_dir(name)
        yield
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadFailed(f"model \"{name}\" has an unreadable config.json: {exc}") from None
        tokenizer_future: Future[Any] = self._tokenizers.submit(
            load_tokenizer, path, None, eos_token_ids=cfg.get("eos_token_id"))
        try:
            model, cfg = load_model(path, lazy=True)
            yield
            deadline = time.perf_counter() + self.slice_seconds
            for _, array in tree_flatten(model.parameters()):
                mx.eval(array)
                if time.perf_counter() >= deadline:
                    yield
                    deadline = time.perf_counter() + self.slice_seconds
            while True:
                try:
                    tokenizer = tokenizer_future.result(timeout=self.slice_seconds)
                    break
                except FuturesTimeout:
                    yield
        except ModelLoadFailed:
            raise
        except Exception as exc:
            raise ModelLoadFailed(f"failed to load model \"{name}\" from {path}: {exc}") from exc
        runner = ModelRunner(name, model, tokenizer, self.context_length(name, cfg), max_batch=self.max_batch,
                             prompt_cache_bytes=self.config.server.prompt_cache_bytes)
        return LoadedModel(runner=runner, path=path, config=cfg)

    def unload(self, loaded: LoadedModel) -> None:
        loaded.runner.close()
        del loaded
        # Drop every reference first, then let MLX return the buffers, so active memory really falls.
        gc.collect()
        mx.clear_cache()

    def reclaimable_memory(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)
