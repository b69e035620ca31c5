"""models/assemble.py: a model dir from uploaded blobs (hard links under checked names), and which kind of create
the file names make. Also the locked build-beside of models/tmpdirs.py that it builds with."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

from mlx_server.models import assemble
from mlx_server.models.assemble import assemble_dir, checked_name, files_kind
from mlx_server.models.sources import complete_model_dir
from mlx_server.models.tmpdirs import building, remove_leftovers


def _blobs(model_dir: Path, store: Path) -> dict[str, Path]:
    """Each file of `model_dir` as an uploaded blob (named by its digest, as the blob store names them)."""
    store.mkdir(parents=True, exist_ok=True)
    files = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            blob = store / f"sha256-{hashlib.sha256(path.read_bytes()).hexdigest()}"
            shutil.copyfile(path, blob)
            files[path.relative_to(model_dir).as_posix()] = blob
    return files


@pytest.fixture
def files(tiny_llama: Path, tmp_path: Path) -> dict[str, Path]:
    return _blobs(tiny_llama, tmp_path / "blobs")


def _nothing_left(parent: Path) -> bool:
    return not parent.exists() or list(parent.iterdir()) == []


def test_a_complete_model_is_assembled_from_hard_links(
    files: dict[str, Path], tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "created" / "tiny-abc"
    assert assemble_dir(files, out) == out
    assert complete_model_dir(out) and sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, blob in files.items():
        assert (out / name).stat().st_ino == blob.stat().st_ino  # no second copy of the weights
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert load_tokenizer(out).encode("hello there") == load_tokenizer(tiny_llama).encode("hello there")
    # Assembling again finds it done.
    assert assemble_dir(files, out) == out


def test_a_one_level_subdirectory_is_allowed(files: dict[str, Path], tmp_path: Path) -> None:
    pooling = tmp_path / "pooling.json"
    pooling.write_text('{"pooling_mode_mean_tokens": true}')
    out = assemble_dir({**files, "1_Pooling/config.json": pooling}, tmp_path / "embedder")
    assert (out / "1_Pooling" / "config.json").read_text() == pooling.read_text()


def test_blobs_on_another_filesystem_are_copied(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(assemble.os, "link", cross_device)
    out = assemble_dir(files, tmp_path / "copied")
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob.read_bytes() and (out / name).stat().st_ino != blob.stat().st_ino


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../config.json", "leaves the model directory"),
        ("a/../../etc/passwd", "at most 1 directory level|leaves the model directory"),
        ("sub/../x", "leaves the model directory"),
        ("/etc/passwd", "absolute path"),
        ("C:/Windows/x", "absolute path"),
        ("..\\x", "use / between directories"),
        (".hidden", "hidden files"),
        ("./config.json", "hidden files and . components"),
        ("sub/.git", "hidden files"),
        ("a//b", "empty path component"),
        ("dir/", "empty path component"),
        ("", "it is empty"),
        ("a/b/c.json", "at most 1 directory level"),
        ("bad\nname", "control characters"),
    ],
)
def test_unsafe_names_are_refused_before_anything_is_written(
    files: dict[str, Path], tmp_path: Path, name: str, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        checked_name(name)
    blob = next(iter(files.values()))
    with pytest.raises(ValueError, match=f"file name .* is not allowed: .*({why})"):
        assemble_dir({**files, name: blob}, tmp_path / "created" / "x")
    assert _nothing_left(tmp_path / "created")


def test_a_model_without_a_tokenizer_is_refused_leaving_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    partial = {n: b for n, b in files.items() if not n.startswith("tokenizer")}
    with pytest.raises(ValueError, match=r"the files do not make a complete model: no tokenizer \(tokenizer\.json"):
        assemble_dir(partial, tmp_path / "created" / "x")
    assert _nothing_left(tmp_path / "created")
    no_weights = {n: b for n, b in files.items() if not n.endswith(".safetensors")}
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        assemble_dir(no_weights, tmp_path / "created" / "x")
    assert _nothing_left(tmp_path / "created")


def test_a_blob_not_uploaded_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json: its blob is not uploaded \(sha256-0+\)"):
        assemble_dir({**files, "tokenizer.json": tmp_path / "blobs" / f"sha256-{'0' * 64}"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_clashing_names_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    blob = next(iter(files.values()))
    with pytest.raises(ValueError, match="differ only in case"):
        assemble_dir({**files, "Config.json": blob}, tmp_path / "out")
    with pytest.raises(ValueError, match="both a file and a directory"):
        assemble_dir({**files, "extra": blob, "extra/config.json": blob}, tmp_path / "out")


def test_an_incomplete_dir_in_the_way_is_not_replaced(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("someone's")
    with pytest.raises(FileExistsError, match="not a complete model dir"):
        assemble_dir(files, out)
    assert (out / "mine.txt").read_text() == "someone's"


def test_leftovers_of_a_killed_build_go_with_the_next_build(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "created" / "tiny"
    killed = out.parent / ".tmp-tiny-89abcdef"
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")
    other = out.parent / ".tmp-tiny-4bit-89abcdef"  # the build of another target whose name starts the same
    other.mkdir()
    assemble_dir(files, out)
    assert not killed.exists() and other.exists()


def test_remove_leftovers_waits_for_no_build(tmp_path: Path) -> None:
    target = tmp_path / "target"
    leftover = tmp_path / ".tmp-target-00000000"
    leftover.mkdir()
    with building(tmp_path / "another") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-another-")
        assert remove_leftovers(target) is False and leftover.exists()  # a build runs here: maybe it is one
    assert not tmp.exists()
    assert remove_leftovers(target) is True and not leftover.exists()


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["model.gguf"], "gguf"),
        (["Model.GGUF"], "gguf"),
        (["config.json", "model.safetensors", "tokenizer.json"], "safetensors"),
        (
            [
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tokenizer.model",
                "1_Pooling/config.json",
            ],
            "safetensors",
        ),
    ],
)
def test_files_kind(names: list[str], kind: str) -> None:
    assert files_kind(names) == kind


@pytest.mark.parametrize(
    ("names", "got"),
    [
        ([], "got no files"),
        (["a.gguf", "b.gguf"], "more than one .gguf"),
        (["model.gguf", "config.json"], "a .gguf with other files"),
        (["config.json", "tokenizer.json"], "got config.json, tokenizer.json"),
        (["model.safetensors", "tokenizer.json"], "got model.safetensors"),
        (["sub/config.json", "model.safetensors"], "got model.safetensors, sub/config.json"),
    ],
)
def test_other_file_sets_are_refused_saying_what_is_accepted(names: list[str], got: str) -> None:
    with pytest.raises(
        ValueError, match="Ollama's create takes files naming one .gguf file, or a safetensors model"
    ) as refused:
        files_kind(names)
    assert got in str(refused.value)


def test_assembled_files_stay_when_the_blob_goes(files: dict[str, Path], tmp_path: Path) -> None:
    out = assemble_dir(files, tmp_path / "out")
    for blob in files.values():
        os.unlink(blob)
    assert complete_model_dir(out)
