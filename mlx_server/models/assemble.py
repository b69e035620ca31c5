"""A model dir from the blobs an /api/create names: `files: {"config.json": "sha256:…", …}`. No MLX here.

Ollama's create takes either one GGUF file or a safetensors model (config.json, tokenizer files, *.safetensors
weights), each file uploaded as a blob and named by its file name. `files_kind` tells which; a GGUF is imported as
any GGUF is (models/children.py), and a safetensors model is put together here: each blob hard-linked under its
name (copied where the blob store is on another filesystem), so a model costs no second copy of its weights.

File names are checked before anything is written: relative, `/`-separated, no empty, `.`, `..` or hidden
components, no backslashes or control characters, and at most one directory level — the depth sentence-transformers
layouts use (`1_Pooling/config.json`, which tells an embedding model's pooling); nothing MLX loads is deeper.

The dir is built beside `out` under its parent's lock and renamed into place (models/tmpdirs.py), after checking
it is a complete model dir: `out` is complete or absent, and a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Literal, Mapping

from mlx_server.models.sources import complete_model_dir, missing_parts
from mlx_server.models.tmpdirs import building

FilesKind = Literal["gguf", "safetensors"]

_MAX_DEPTH = 2  # components: "1_Pooling/config.json"
_ACCEPTED = (
    "Ollama's create takes files naming one .gguf file, or a safetensors model: config.json, its tokenizer files "
    "(tokenizer.json / tokenizer.model / tokenizer_config.json) and its *.safetensors weights"
)


def files_kind(names: Iterable[str]) -> FilesKind:
    """Which create this is: one .gguf file alone ("gguf"), or config.json with *.safetensors weights
    ("safetensors"); anything else is a ValueError saying what is accepted."""
    listed = list(names)
    ggufs = [n for n in listed if n.lower().endswith(".gguf")]
    shown = ", ".join(sorted(listed)) or "no files"
    if ggufs:
        if len(listed) == 1:
            return "gguf"
        extra = "more than one .gguf" if len(ggufs) > 1 else "a .gguf with other files"
        raise ValueError(f"{_ACCEPTED}; got {extra} ({shown})")
    top = [n for n in listed if "/" not in n]
    if "config.json" in top and any(n.lower().endswith(".safetensors") for n in top):
        return "safetensors"
    raise ValueError(f"{_ACCEPTED}; got {shown}")


def checked_name(name: str) -> PurePosixPath:
    """`name` as a path inside the model dir, or ValueError saying why it cannot be one."""
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"file name {name!r} is not allowed: {problem}")
    return PurePosixPath(name)


def assemble_dir(files: Mapping[str, Path], out: Path) -> Path:
    """Make the model dir `out` from `files` (file name → blob path); return `out`.

    Raises ValueError for a name that is not allowed, a blob that is not there, or files that do not make a
    complete model (naming what is missing). An `out` already complete is returned as it is (callers name it by
    the files' digests); one that exists incomplete, which no assembly leaves, raises FileExistsError.
    """
    names = {name: checked_name(name) for name in files}
    _check_layout(list(names.values()))
    for name, blob in files.items():
        if not Path(blob).is_file():
            raise ValueError(f"{name}: its blob is not uploaded ({Path(blob).name}); upload it first")
    if complete_model_dir(out):
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists and is not a complete model dir; remove it")
    with building(out) as tmp:
        for name, rel in names.items():
            _place(Path(files[name]), tmp.joinpath(*rel.parts))
        if not complete_model_dir(tmp):
            raise ValueError(f"the files do not make a complete model: {missing_parts(tmp)}")
        if complete_model_dir(out):  # a concurrent assembly finished while we waited for the lock
            return out
        os.rename(tmp, out)
    return out


def _name_problem(name: str) -> str:
    if not name:
        return "it is empty"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "it holds control characters"
    if "\\" in name:
        return "use / between directories"
    if name.startswith("/") or PureWindowsPath(name).drive:
        return "it is an absolute path"
    parts = name.split("/")
    if any(part == "" for part in parts):
        return "it has an empty path component"
    if ".." in parts:
        return "it leaves the model directory (..)"
    if any(part.startswith(".") for part in parts):
        return "hidden files and . components are not part of a model"
    if len(parts) > _MAX_DEPTH:
        return f"at most {_MAX_DEPTH - 1} directory level (as 1_Pooling/config.json)"
    return ""


def _check_layout(paths: list[PurePosixPath]) -> None:
    # Names that differ only in case are one file on macOS's filesystem; a file cannot also be a directory.
    folded: dict[str, PurePosixPath] = {}
    for path in paths:
        other = folded.setdefault(str(path).casefold(), path)
        if other != path:
            raise ValueError(f"file names {str(other)!r} and {str(path)!r} differ only in case")
    dirs = {str(p.parent).casefold() for p in paths if len(p.parts) > 1}
    for path in paths:
        if str(path).casefold() in dirs:
            raise ValueError(f"{str(path)!r} is both a file and a directory in files")


def _place(blob: Path, dest: Path) -> None:
    dest.parent.mkdir(exist_ok=True)
    try:
        os.link(blob, dest)
    except OSError:  # another filesystem, or one without hard links: a copy costs disk, not correctness
        shutil.copyfile(blob, dest)


__all__ = ["FilesKind", "assemble_dir", "checked_name", "files_kind"]
