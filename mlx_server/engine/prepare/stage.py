"""The preparation stage: everything a request needs before it can join a batch, done off the inference thread.

Templating, tokenization (a 30,000-token prompt takes seconds), the grammar's vocabulary scan and compilation,
and GGUF import (hashing and converting gigabytes) would each freeze every running stream if they ran on the
inference thread. Here they run in worker threads — and a GGUF import in a child process, because converting
uses MLX and only the inference thread may touch MLX in this process — and hand the inference thread a
`Prepared` request that it only has to admit and step.

Per model, the stage keeps what is cheap to keep and slow to make: the model dir (after import), the tokenizer
(shared with the loaded runner, which only detokenizes) and the grammar vocabulary. Each is made once
(single-flight per model) and survives model unloads, so counting tokens never loads a model.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from mlx_server.config.load import Config
from mlx_server.config.tree import PROMPT_LOOKUP
from mlx_server.contract.errors import BadRequest, MlxServerError, ModelLoadFailed, ModelNotFound
from mlx_server.contract.requests import EmbedRequest, GenerateRequest
from mlx_server.engine.loop.budget import pass_tokens
from mlx_server.engine.prepare.constrained import Constraints
from mlx_server.engine.prepare.embed_tokenizer import EmbedTokenizer
from mlx_server.engine.prepare.images import ImageLimits, decode_images
from mlx_server.engine.prepare.prompt import (
    fit,
    prompt_text,
    render,
    render_fitting,
    shift_keep,
    templated,
    with_model_turns,
)
from mlx_server.engine.prepare.vision import (
    VisionProcessor,
    VisionPrompt,
    cut,
    has_images,
    is_vision_config,
    needs_mlx_vlm,
    request_images,
    vision_prompt,
    with_positions,
)
from mlx_server.models.children import ChildFailed, import_gguf_child
from mlx_server.models.embedinfo import EmbeddingInfo, embedding_info
from mlx_server.models.info import context_note, kv_bytes_per_token, native_context_length
from mlx_server.models.rerankinfo import RerankInfo, rerank_info
from mlx_server.models.sources import locate, weights_size

log = logging.getLogger("mlx_server.engine.prepare.stage")


@dataclass(frozen=True)
class Prepared:
    """A generation ready to admit: its prompt fitted to the context, its grammar compiled."""

    request: GenerateRequest
    tokens: list[int]
    num_ctx: int
    max_tokens: int
    truncated: int
    grammar: list[Any] = field(default_factory=list)  # logits processors from Constraints (compiled here)
    keep: int = 0  # tokens at the prompt's head a context shift keeps (request.shift; 0 when it cannot shift)

    @property
    def kv_tokens(self) -> int:
        """The most KV this sequence can ever hold: what admission reserves for it."""
        return min(self.num_ctx, len(self.tokens) + self.max_tokens)


P = TypeVar("P", bound=Prepared)


@dataclass(frozen=True)
class PreparedEmbed:
    """An embed request ready to admit: every input tokenized and fitted to the context."""

    request: EmbedRequest
    inputs: list[list[int]]
    dimensions: Optional[int]

    @property
    def kv_tokens(self) -> int:
        """Tokens in the largest forward pass it can make (what its activations take, for the budget)."""
        return pass_tokens(sum(len(ids) for ids in self.inputs), max((len(ids) for ids in self.inputs), default=0))


@dataclass
class ModelFiles:
    """What the preparation stage knows about one model; made once, kept across unloads."""

    name: str
    path: Path
    config: dict[str, Any]
    context_length: int
    weights: int  # bytes on disk: what loading it adds to the budget
    kv_per_token: int  # estimated from config.json until the loaded runner knows the real float type
    tokenizer: Any  # mlx_lm's TokenizerWrapper; an EmbedTokenizer for an embedding model
    constraints: Optional[Constraints]  # None for an embedding model
    embedding: Optional[EmbeddingInfo] = None  # set for an embedding-only model
    vision: Optional[VisionProcessor] = None  # set for a vision model: its image processor and image tokens
    draft: Optional[ModelFiles] = None  # its draft model's (speculative decoding): loaded and evicted with it
    rerank: Optional[RerankInfo] = None  # set for a reranker (whose `embedding` then describes its encoder)

    def width(self) -> int:
        """The width of the vectors it embeds."""
        if self.embedding is not None:
            return self.embedding.dimensions
        text = self.config.get("text_config", {})
        return int(self.config.get("hidden_size") or text.get("hidden_size") or 0)


class Preparer:
    def __init__(
        self, config: Config, *, workers: int = 2, importer: Optional[Callable[[Path, Path], Path]] = None
    ) -> None:
        self.config = config
        self._config_dir = config.path.parent if config.path else None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
        self._importer = importer or import_in_child
        self._files: dict[str, ModelFiles] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._pool

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- per-model files (any worker thread) --------------------------------------------------------------

    def files(self, name: str) -> ModelFiles:
        """The model's dir, config, tokenizer and grammar vocabulary; imported / loaded once, single-flight."""
        known = self._files.get(name)
        if known is not None:
            return known
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            known = self._files.get(name)
            if known is None:
                known = self._files[name] = self._make_files(name)
            return known

    def forget(self, name: str) -> None:
        """Drop `name`'s files (a created model was replaced): its next request reads them again."""
        with self._guard:
            self._files.pop(name, None)

    def _make_files(self, name: str) -> ModelFiles:
        from mlx_lm.utils import load_tokenizer  # deferred: importing mlx_lm pulls in transformers

        path = self.model_dir(name)
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadFailed(f'model "{name}" has an unreadable config.json: {exc}') from None
        rerank = rerank_info(path, self.config.models[name].kind)
        if rerank is not None:  # loaded, tokenized and budgeted as an embedding model is; only its kind differs
            return replace(self._embedding_files(name, path, cfg, rerank.encoder), rerank=rerank)
        info = embedding_info(path, self.config.models[name].kind)
        if info.is_embedding:
            return self._embedding_files(name, path, cfg, info)
        try:
            tokenizer = load_tokenizer(path, None, eos_token_ids=cfg.get("eos_token_id"))
        except Exception as exc:  # noqa: BLE001 - a broken tokenizer fails this model only
            raise ModelLoadFailed(f'failed to load the tokenizer of model "{name}": {exc}') from exc
        configured = self.config.models[name].context_length
        native = native_context_length(cfg)
        note = context_note(name, configured, native)
        if note is not None:
            log.warning("%s", note)
        vision = None
        if is_vision_config(cfg) or self.config.models[name].kind == "vision":
            try:
                vision = VisionProcessor.load(path, cfg)
            except ImportError as exc:
                raise ModelLoadFailed(needs_mlx_vlm(name, exc)) from exc
            except Exception as exc:  # noqa: BLE001 - a broken processor fails this model only
                raise ModelLoadFailed(f'failed to load the image processor of model "{name}": {exc}') from exc
        draft = self._draft_files(name, tokenizer) if vision is None else None
        return ModelFiles(
            name=name,
            path=path,
            config=cfg,
            tokenizer=tokenizer,
            constraints=Constraints(tokenizer),
            context_length=configured or native,  # above native too, as Ollama's num_ctx (with a warning)
            # The draft model's weights and KV are part of this model's: one load, one eviction, one reservation.
            weights=weights_size(path) + (draft.weights if draft is not None else 0),
            kv_per_token=_kv_estimate(cfg) + (draft.kv_per_token if draft is not None else 0),
            vision=vision,
            draft=draft,
        )

    def _draft_files(self, name: str, tokenizer: Any) -> Optional[ModelFiles]:
        """The files of `name`'s draft model, refused unless it is a text model with exactly the same vocabulary
        (a draft token must mean the same text to the target)."""
        wanted = self.config.models[name].draft
        if wanted is None or wanted == PROMPT_LOOKUP:
            return None
        draft_name = self.config.resolve(wanted) or wanted
        files = self.files(draft_name)
        if files.embedding is not None or files.vision is not None:
            raise ModelLoadFailed(f'model "{name}" cannot draft with "{draft_name}": it is not a text generation model')
        ours, theirs = tokenizer.get_vocab(), files.tokenizer.get_vocab()
        if ours != theirs:
            differ = len(set(ours.items()) ^ set(theirs.items()))
            raise ModelLoadFailed(
                f'model "{name}" cannot draft with "{draft_name}": their vocabularies differ '
                f"({len(ours)} and {len(theirs)} tokens, {differ} entries not shared)"
            )
        return files

    def _embedding_files(self, name: str, path: Path, cfg: dict[str, Any], info: EmbeddingInfo) -> ModelFiles:
        configured = self.config.models[name].context_length
        try:
            tokenizer = EmbedTokenizer.from_dir(
                path, min(configured, info.max_length) if configured else info.max_length
            )
        except Exception as exc:  # noqa: BLE001 - a broken tokenizer fails this model only
            raise ModelLoadFailed(f'failed to load the tokenizer of model "{name}": {exc}') from exc
        # What a forward pass holds per token (hidden, MLP and attention buffers, float32), in kv_bound's units.
        # Attention scores are per token × the batch's padded width; the width is capped at 1,024 here, since a
        # long-context embedder (8k–32k) would otherwise reserve gigabytes for widths requests rarely reach.
        heads = int(cfg.get("num_attention_heads", 12))
        per_token = 4 * (8 * info.dimensions + heads * min(info.max_length, 1024)) // 2
        return ModelFiles(
            name=name,
            path=path,
            config=cfg,
            tokenizer=tokenizer,
            constraints=None,
            context_length=tokenizer.max_length,
            weights=weights_size(path),
            kv_per_token=per_token,
            embedding=info,
        )

    def model_dir(self, name: str) -> Path:
        model = self.config.models.get(name)
        if model is None:
            raise ModelNotFound(name)
        found = locate(model, self._config_dir, self.config.server.cache_dir)
        if not found.present:
            raise ModelNotFound(name, found.hint)
        assert found.path is not None
        if found.kind == "ollama-mlx":
            return self._assemble(name, model.source)
        if found.kind not in ("gguf", "package", "ollama"):  # "zip": locate already extracted it into a model dir
            return found.path
        try:
            return self._importer(found.path, self.config.server.cache_dir)
        except MlxServerError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad GGUF fails this model only
            raise ModelLoadFailed(f'failed to import GGUF for model "{name}": {exc}') from exc

    def _assemble(self, name: str, source: str) -> Path:
        from mlx_server.models.ollama_store import OllamaError, read_manifest
        from mlx_server.models.ollama_tensors import model_dir

        try:
            path = model_dir(read_manifest(source), self.config.server.cache_dir)
        except (OllamaError, OSError, ValueError) as exc:
            raise ModelLoadFailed(f'failed to assemble model "{name}" from the Ollama store: {exc}') from exc
        log.info("model %s: Ollama safetensors layers assembled in %s", name, path)
        return path

    # ---- requests (worker threads) ------------------------------------------------------------------------

    def prepare(self, req: GenerateRequest) -> Prepared:
        files = self.generation_files(req.model)
        if files.vision is not None:
            return self.prepare_vision(req)[0]  # its text tokenized as its processor does, BOS included
        if has_images(req):
            raise BadRequest(f'"{req.model}" does not support images')
        model = self.config.models[req.model]
        req = with_model_turns(req, model)
        return prepare_request(req, templated(files.tokenizer, model), files.context_length, files.constraints)

    def count(self, req: GenerateRequest) -> int:
        files = self.generation_files(req.model)
        model = self.config.models[req.model]
        req = with_model_turns(req, model)
        if has_images(req) or files.vision is not None:
            return len(self.vision_prompt(req, files).tokens)
        return len(render(req, templated(files.tokenizer, model), req.model))

    def prepare_vision(self, req: GenerateRequest) -> tuple[Prepared, VisionPrompt]:
        """Decode and check the images, place them by the template, expand them into the family's image tokens,
        fit the prompt and compile its grammar: raises BadRequest for the client's mistakes."""
        files = self.generation_files(req.model)
        req = with_model_turns(req, self.config.models[req.model])
        prompt = self.vision_prompt(req, files)
        fitted = fit(prompt.tokens, req, files.context_length, req.model)
        assert files.vision is not None
        prompt = with_positions(cut(prompt, fitted.truncated), files.vision)
        grammar = (files.constraints or Constraints(files.tokenizer)).processors(req, fitted.max_tokens)
        prepared = Prepared(req, fitted.tokens, fitted.num_ctx, fitted.max_tokens, fitted.truncated, grammar)
        return prepared, prompt

    def vision_prompt(self, req: GenerateRequest, files: ModelFiles) -> VisionPrompt:
        if files.vision is None:
            raise BadRequest(f'"{req.model}" does not support images')
        server, model = self.config.server, self.config.models[req.model]
        limits = ImageLimits(server.max_images, int(server.max_image_bytes), model.max_pixels, server.fetch_image_urls)
        decoded = decode_images(request_images(req), limits)
        return vision_prompt(
            req, files.vision, decoded, lambda messages: prompt_text(req, files.tokenizer, req.model, messages)
        )

    def generation_files(self, name: str) -> ModelFiles:
        files = self.files(name)
        if files.embedding is not None:
            raise BadRequest(f'"{name}" does not support generate')
        return files

    def with_grammar(self, prepared: P) -> P:
        """`prepared` with its grammar compiled here (a distributed follower gets rank 0's prompt without it)."""
        files = self.files(prepared.request.model)
        constraints = files.constraints or Constraints(files.tokenizer)
        return replace(prepared, grammar=constraints.processors(prepared.request, prepared.max_tokens))

    def prepare_embed(self, req: EmbedRequest) -> PreparedEmbed:
        """Tokenize and fit every input: raises BadRequest for the client's mistakes, naming the input."""
        files = self.files(req.model)
        width = files.width()
        if req.dimensions is not None and not 0 < req.dimensions <= width:
            raise BadRequest(f'dimensions must be between 1 and {width} for model "{req.model}", got {req.dimensions}')
        limit = min(req.num_ctx, files.context_length) if req.num_ctx else files.context_length
        texts = [x for x in req.inputs if isinstance(x, str)]
        if isinstance(files.tokenizer, EmbedTokenizer):
            encoded = iter(files.tokenizer.encode(texts, truncate=False))
        else:
            encoded = iter([list(files.tokenizer.encode(t)) for t in texts])
        vocab = int(files.config.get("vocab_size") or files.config.get("text_config", {}).get("vocab_size") or 0)
        inputs: list[list[int]] = []
        for index, item in enumerate(req.inputs):
            ids = next(encoded) if isinstance(item, str) else list(item)
            if not ids:
                raise BadRequest(f"input {index} is empty")
            if vocab and not all(0 <= t < vocab for t in ids):
                raise BadRequest(f"input {index} has token ids outside the model's vocabulary (0..{vocab - 1})")
            if len(ids) > limit:
                if not req.truncate:
                    raise BadRequest(
                        f"input {index} has {len(ids)} tokens, more than the context length "
                        f"({limit}); send truncate: true to cut it"
                    )
                ids = _cut(ids, limit, files.tokenizer)
            inputs.append(ids)
        return PreparedEmbed(request=req, inputs=inputs, dimensions=req.dimensions)


def prepare_request(
    req: GenerateRequest, tokenizer: Any, context_length: int, constraints: Optional[Constraints] = None
) -> Prepared:
    """Render, tokenize, fit and compile: raises BadRequest for the client's mistakes."""
    fitted = fit(render_fitting(req, tokenizer, context_length, req.model), req, context_length, req.model)
    grammar = (constraints or Constraints(tokenizer)).processors(req, fitted.max_tokens)
    return Prepared(
        request=req,
        tokens=fitted.tokens,
        num_ctx=fitted.num_ctx,
        max_tokens=fitted.max_tokens,
        truncated=fitted.truncated,
        grammar=grammar,
        keep=shift_keep(req, tokenizer, fitted.tokens, req.model) if req.shift else 0,
    )


def _cut(ids: list[int], limit: int, tokenizer: Any) -> list[int]:
    """Keep an input's start; an embedding model's closing special tokens ([SEP], </s>, <|endoftext|>) stay last."""
    if isinstance(tokenizer, EmbedTokenizer):
        return tokenizer.cut(ids, limit)
    return ids[:limit]


def _kv_estimate(cfg: dict[str, Any]) -> int:
    dtype = str(cfg.get("torch_dtype") or cfg.get("text_config", {}).get("torch_dtype") or "float16")
    return kv_bytes_per_token(cfg) * (2 if "32" in dtype else 1)  # modelinfo counts 2 bytes per element


def import_in_child(gguf: Path, cache_dir: Path) -> Path:
    """Import a GGUF in a child process: conversion runs MLX, which only the inference thread may use here.

    The child returns at once when the import is already cached (its hash is remembered per path and mtime).
    Its report (template in use, requantization error) is logged as it comes.
    """
    try:
        return import_gguf_child(gguf, cache_dir, on_line=lambda line: log.info("%s: %s", gguf.name, line))
    except ChildFailed as exc:
        raise ModelLoadFailed(f"importing {gguf.name} failed: {exc.message}") from None


__all__ = ["ModelFiles", "Prepared", "PreparedEmbed", "Preparer", "import_in_child", "prepare_request"]
