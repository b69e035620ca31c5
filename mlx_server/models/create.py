"""Building the model an /api/create asks for: from another model, or from uploaded files, optionally quantized.

Runs in a worker thread (the API awaits it); every conversion runs in a child process (models/children.py), so
neither the event loop nor the inference thread does any of it. `report` gets Ollama-style status lines as the
work goes, `cancel` stops it (the client went away): a child is killed and its half-built directory removed.

- `from` a model (configured, created, or in the Ollama store): a new name for the same weights (no copy) with
  its own system prompt, template, parameters, messages and license. With `quantize`, an unquantized safetensors
  model is quantized into a directory of its own; a GGUF keeps its quantization (its K-quants are read as they
  are), which the status lines say.
- `files` naming uploaded blobs: one GGUF (imported as models.yaml GGUFs are, into the shared import cache), or a
  safetensors model (config.json, tokenizer files, weights) assembled under `cache_dir/created` from hard links to
  the blobs, then quantized when asked.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from mlx_server.config.tree import ModelConfig
from mlx_server.models.assemble import assemble_dir, files_kind
from mlx_server.models.children import ChildFailed, import_gguf_child, quantize_child
from mlx_server.models.quantize import quant_mode
from mlx_server.models.registry import Created, Registry
from mlx_server.models.sources import complete_model_dir, locate

Report = Callable[[str], None]

# Sources whose weights are GGUF (converted on use): quantizing them again is not ours to do.
_GGUF_KINDS = ("gguf", "ollama", "package")


class CreateError(ValueError):
    """The request cannot be built as asked (a 400 with this message)."""


@dataclass(frozen=True)
class Recipe:
    """What one /api/create asks for, checked by the API: `base` or `files`, then the layers to set."""

    name: str
    base: Optional[ModelConfig] = None  # `from`, resolved
    files: Mapping[str, str] = field(default_factory=dict)  # file name → hex digest of an uploaded blob
    quantize: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    messages: Optional[tuple[Mapping[str, Any], ...]] = None
    license: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Workshop:
    """Where building happens: the registry, where blobs are, and the dirs sources are resolved against."""

    registry: Registry
    blob_path: Callable[[str], Path]
    cache_dir: Path
    config_dir: Optional[Path] = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one build at a time: each is CPU- and disk-heavy


def build(recipe: Recipe, shop: Workshop, report: Report, cancel: Optional[threading.Event] = None) -> Created:
    """Build `recipe` and record it in the registry; raises CreateError for what the client got wrong."""
    mode = _mode(recipe.quantize)
    try:
        return _build(recipe, shop, mode, report, cancel)
    except ChildFailed as exc:  # the conversion refused these files (a corrupt GGUF, an unknown architecture)
        raise CreateError(f"converting the model failed: {exc.message}") from None


def _build(recipe: Recipe, shop: Workshop, mode: Any, report: Report, cancel: Optional[threading.Event]) -> Created:
    with shop.lock:
        if recipe.files:
            model, owned, blobs = _from_files(recipe, shop, mode, report, cancel)
        elif recipe.base is not None:
            model, owned, blobs = _from_model(recipe, recipe.base, shop, mode, report, cancel)
        else:
            raise CreateError("neither from nor files: name the model to build on, or upload its files")
        model = _layered(model, recipe)
        report("writing manifest")
        created = Created(model=model, owned=owned, blobs=blobs, created_at=time.time())
        shop.registry.put(created)
        return created


def _mode(name: Optional[str]) -> Any:
    if not name:
        return None
    try:
        return quant_mode(name)
    except ValueError as exc:
        raise CreateError(str(exc)) from None


def _from_files(
    recipe: Recipe, shop: Workshop, mode: Any, report: Report, cancel: Optional[threading.Event]
) -> tuple[ModelConfig, Optional[Path], tuple[str, ...]]:
    try:
        kind = files_kind(list(recipe.files))
    except ValueError as exc:
        raise CreateError(str(exc)) from None
    for digest in recipe.files.values():
        report(f"using existing layer sha256:{digest}")
    blobs = tuple(dict.fromkeys(recipe.files.values()))
    if kind == "gguf":
        (digest,) = recipe.files.values()
        report("parsing GGUF")
        if mode is not None:
            report(f"quantize {recipe.quantize}: not applied, a GGUF keeps its own quantization (read as it is)")
        path = import_gguf_child(shop.blob_path(digest), shop.cache_dir, on_line=report, cancel=cancel)
        return ModelConfig(source=str(path)).renamed(recipe.name), path, blobs
    key = hashlib.sha256(json.dumps(sorted(recipe.files.items())).encode()).hexdigest()[:12]
    out = shop.registry.created_dir / f"{_slug(recipe.name)}-{key}"
    if not complete_model_dir(out):
        report("assembling model files")
        try:
            assemble_dir({name: shop.blob_path(d) for name, d in recipe.files.items()}, out)
        except ValueError as exc:
            raise CreateError(str(exc)) from None
    if mode is None:
        return ModelConfig(source=str(out)).renamed(recipe.name), out, blobs
    quantized = _quantized(out, shop, mode, recipe.quantize or "", report, cancel)
    if not shop.registry.in_use(out):
        shutil.rmtree(out, ignore_errors=True)  # Ollama keeps only the quantized layers, and so do we
    return ModelConfig(source=str(quantized)).renamed(recipe.name), quantized, blobs


def _from_model(
    recipe: Recipe, base: ModelConfig, shop: Workshop, mode: Any, report: Report, cancel: Optional[threading.Event]
) -> tuple[ModelConfig, Optional[Path], tuple[str, ...]]:
    # A new name, never the original's aliases (they name the original) nor its preload flag.
    model = base.model_copy(update={"aliases": (), "preload": False}).renamed(recipe.name)
    original = shop.registry.get(base.name)
    owned, blobs = (original.owned, original.blobs) if original is not None else (None, ())
    report(f"using existing model {base.name}")
    if mode is None:
        return model, owned, blobs
    found = locate(base, shop.config_dir, shop.cache_dir)
    if not found.present or found.path is None:
        raise CreateError(f'model "{base.name}" is not on disk ({found.hint}): pull it first')
    if found.kind in _GGUF_KINDS:
        report(f"quantize {recipe.quantize}: not applied, a GGUF keeps its own quantization (read as it is)")
        return model, owned, blobs
    quantized = _quantized(found.path, shop, mode, recipe.quantize or "", report, cancel)
    return model.model_copy(update={"source": str(quantized)}), quantized, ()


def _quantized(
    src: Path, shop: Workshop, mode: Any, asked: str, report: Report, cancel: Optional[threading.Event]
) -> Path:
    config = _read_config(src)
    if "quantization" in config or "quantization_config" in config:
        raise CreateError(f"the model in {src.name} is already quantized: quantize needs float (f16/bf16/f32) weights")
    out = shop.registry.created_dir / f"{src.name}-{mode.bits}bit-g{mode.group_size}"
    if complete_model_dir(out):
        return out
    report(f"quantizing to {mode.label} (for {asked})")
    return quantize_child(src, out, mode, on_line=report, cancel=cancel)


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise CreateError(f"cannot read the model's config.json: {exc}") from None


def _layered(model: ModelConfig, recipe: Recipe) -> ModelConfig:
    """The model with the request's layers over its own: what is given replaces, parameters merge (as Ollama)."""
    update: dict[str, Any] = {"options": {**model.options, **recipe.parameters}}
    if recipe.system is not None:
        update["system"] = recipe.system
    if recipe.template is not None:
        update["template"] = recipe.template
    if recipe.messages is not None:
        update["messages"] = recipe.messages
    if recipe.license is not None:
        update["license"] = recipe.license
    return model.model_copy(update=update)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


__all__ = ["CreateError", "Recipe", "Workshop", "build"]
