"""Where a configured model's weights live, and whether they are on disk. No MLX here: listings call this.

Sources: a Hugging Face repo id (looked up in the local HF cache only; requests never download), a local model
directory, a path to a .gguf file, or `package:MODULE/FILE` (a file shipped inside an installed Python package).
Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from mlx_server.config import ModelConfig

SourceKind = Literal["hf", "dir", "gguf", "package"]


@dataclass(frozen=True)
class Located:
    kind: SourceKind
    path: Optional[Path]  # model dir or .gguf file; None when not on disk
    size: int  # bytes of weights on disk (0 when absent)
    hint: str = ""  # how to get it, when absent

    @property
    def present(self) -> bool:
        return self.path is not None

    @property
    def digest(self) -> str:
        # Ollama clients show a digest; ours is stable per location, cheap, and changes when the weights move.
        seed = f"{self.path}:{self.size}".encode()
        return hashlib.sha256(seed).hexdigest()


def resolve_package_file(spec: str) -> Path:
    """'package:MODULE/FILE' → the file inside the installed package, found without importing the package."""
    if not spec.startswith("package:") or "/" not in spec:
        raise ValueError(f"expected 'package:MODULE/FILE', got {spec!r}")
    module, _, rel = spec[len("package:") :].partition("/")
    hint = f"pip install {module.replace('_', '-')}"
    try:
        # find_spec only locates the package; importing it could pull in heavy dependencies.
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise FileNotFoundError(f"Python package {module!r} is not installed ({hint})")
    if not found.submodule_search_locations:
        raise FileNotFoundError(f"{module!r} is a plain module, not a package that can ship {rel!r}")
    for root in found.submodule_search_locations:
        candidate = Path(root, rel)
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{rel!r} not found in installed package {module!r}; reinstall it ({hint})")


def _is_hf_repo_id(source: str) -> bool:
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
            and not source.endswith(".gguf"))


def weights_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def complete_model_dir(model_dir: Path) -> bool:
    """config.json, a tokenizer, and every shard named by the safetensors index (or at least one shard)."""
    if not (model_dir / "config.json").is_file():
        return False
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return False
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, OSError):
            return False
        return all((model_dir / s).is_file() for s in shards)
    return any(model_dir.glob("*.safetensors"))


def hf_cached_snapshot(repo_id: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache  # deferred: keeps `import mlx_server` light

    hit = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(hit, str):
        return Path(hit).parent
    return None


def locate(model: ModelConfig, config_dir: Optional[Path] = None) -> Located:
    source = model.source.strip()
    base = config_dir or Path.cwd()
    if source.startswith("package:"):
        try:
            path = resolve_package_file(source)
        except (FileNotFoundError, ValueError) as exc:
            return Located("package", None, 0, str(exc))
        return Located("package", path, path.stat().st_size)
    if _is_hf_repo_id(source) and not (base / source).exists():
        snap = hf_cached_snapshot(source)
        if snap is not None and complete_model_dir(snap):
            return Located("hf", snap, weights_size(snap))
        return Located("hf", None, 0, f"pull it first: mlx-server pull {model.name}")
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (base / path).resolve()
    if path.suffix == ".gguf":
        if path.is_file():
            return Located("gguf", path, path.stat().st_size)
        return Located("gguf", None, 0, f"GGUF file {path} does not exist")
    if path.is_dir() and complete_model_dir(path):
        return Located("dir", path, weights_size(path))
    return Located("dir", None, 0, f"model directory {path} is missing or incomplete")
