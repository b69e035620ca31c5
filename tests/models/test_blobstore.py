"""The blob store: digests parsed, uploads verified while written, and nothing half-written ever left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from mlx_server.contract.errors import BadRequest, InsufficientStorage, PayloadTooLarge
from mlx_server.models.blobs import BadDigest, BlobStore, DigestMismatch, NoSpace, TooLarge, parse_digest

DATA = b"some model file bytes " * 1000
HEX = hashlib.sha256(DATA).hexdigest()
PLENTY = 1 << 50


def store_at(tmp_path: Path, **kw: Any) -> BlobStore:
    kw.setdefault("free_space", lambda _: PLENTY)
    return BlobStore(tmp_path / "blobs", **kw)


def leftovers(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


def test_parse_digest() -> None:
    assert parse_digest(f"sha256:{HEX}") == HEX
    assert parse_digest(f"sha256-{HEX}") == HEX  # Ollama's file naming
    assert parse_digest(f"sha256:{HEX.upper()}") == HEX
    for bad in (
        "",
        HEX,
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        f"sha512:{HEX}",
        f"sha256:{HEX[:-1]}g",
        f" sha256:{HEX}",
        f"sha256:{HEX}\n",
        "sha256:../../etc/passwd",
    ):
        with pytest.raises(ValueError, match="invalid digest format") as err:
            parse_digest(bad)
        assert isinstance(err.value, BadRequest)  # a 400 wherever it surfaces


def test_path_names_blobs_as_ollama_and_refuses_anything_else(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    assert store.path(HEX) == tmp_path / "blobs" / f"sha256-{HEX}"
    assert store.path(HEX.upper()) == store.path(HEX)
    with pytest.raises(BadDigest):
        store.path("../" + HEX[3:])
    assert not store.exists(HEX)
    assert not store.root.exists()  # created on the first upload, not before


def test_upload_verified_and_moved_into_place(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    upload = store.upload(HEX, len(DATA))
    for i in range(0, len(DATA), 4096):
        upload.write(DATA[i : i + 4096])
        assert not store.exists(HEX)  # never visible under its name before it is whole and checked
    assert upload.finish() == store.path(HEX)
    assert store.path(HEX).read_bytes() == DATA
    assert leftovers(store) == [f"sha256-{HEX}"]
    assert upload.settled
    upload.abort()  # after finishing: nothing to undo, the blob stays
    assert store.exists(HEX)


def test_mismatch_names_both_digests_and_leaves_nothing(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    other = hashlib.sha256(b"something else").hexdigest()
    upload = store.upload(other)
    upload.write(DATA)
    with pytest.raises(DigestMismatch) as err:
        upload.finish()
    assert err.value.status == 400
    assert err.value.message == f'digest mismatch, expected "sha256:{other}", got "sha256:{HEX}"'
    assert leftovers(store) == []


def test_too_large_announced_or_streamed(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_bytes=1000)
    with pytest.raises(TooLarge) as err:
        store.upload(HEX, 1001)
    assert isinstance(err.value, PayloadTooLarge) and "1000 bytes" in err.value.message
    assert leftovers(store) == []
    upload = store.upload(HEX)  # no size announced: counted as written
    upload.write(b"x" * 600)
    with pytest.raises(TooLarge):
        upload.write(b"x" * 401)
    assert leftovers(store) == []
    with pytest.raises(RuntimeError):
        upload.write(b"x")  # a failed upload takes no more bytes


def test_disk_checked_first_and_while_writing(tmp_path: Path) -> None:
    store = store_at(tmp_path, free_space=lambda _: 10_000, margin=1000)
    with pytest.raises(NoSpace) as err:
        store.upload(HEX, 9001)  # 9001 + the margin does not fit in 10000
    assert isinstance(err.value, InsufficientStorage) and err.value.status == 507
    assert "10000 bytes free" in err.value.message
    assert leftovers(store) == []
    store.upload(HEX, 9000).abort()  # fits exactly

    free = [PLENTY]
    store = store_at(tmp_path, free_space=lambda _: free[0], margin=1000)
    upload = store.upload(HEX)
    upload.write(DATA[:5000])
    free[0] = 1500  # someone else filled the disk meanwhile
    with pytest.raises(NoSpace):
        upload.write(DATA[5000:6000])
    assert leftovers(store) == []


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_enospc_while_writing_is_no_space_and_leaves_nothing(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    upload = store.upload(HEX)
    upload.write(DATA[:100])
    upload._out = FullDisk(upload._out)  # type: ignore[assignment]
    with pytest.raises(NoSpace, match="disk filled up"):
        upload.write(DATA[100:])
    assert leftovers(store) == []


def test_abort_and_with_block_leave_nothing(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    upload = store.upload(HEX)
    upload.write(DATA[:100])
    assert len(leftovers(store)) == 1 and leftovers(store)[0].startswith(f".sha256-{HEX}.")
    upload.abort()
    upload.abort()
    assert leftovers(store) == []
    with pytest.raises(KeyError), store.upload(HEX) as second:
        second.write(DATA[:100])
        raise KeyError("the caller failed")
    assert leftovers(store) == []
    with store.upload(HEX) as third:
        third.write(DATA)
        third.finish()
    assert leftovers(store) == [f"sha256-{HEX}"]


def test_identical_uploads_at_once(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    uploads = [store.upload(HEX, len(DATA)) for _ in range(4)]
    errors: list[BaseException] = []

    def run(upload: Any) -> None:
        try:
            for i in range(0, len(DATA), 1000):
                upload.write(DATA[i : i + 1000])
            upload.finish()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert leftovers(store) == [f"sha256-{HEX}"] and store.path(HEX).read_bytes() == DATA


def test_opening_a_store_removes_crashed_partials_but_not_live_ones(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    live = store.upload(HEX)  # a writer in progress holds its partial's lock
    live.write(DATA[:100])
    crashed = store.root / f".sha256-{HEX}.0123456789abcdef.partial"  # no writer: what a crash leaves
    crashed.write_bytes(b"half")
    unrelated = store.root / "notes.txt"
    unrelated.write_text("not ours to remove")

    reopened = store_at(tmp_path)
    assert not crashed.exists()
    assert live.partial.exists() and unrelated.exists()
    assert reopened.sweep() == 0
    live.write(DATA[100:])
    live.finish()
    assert reopened.exists(HEX)


def test_blob_mode_is_readable(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    with store.upload(HEX) as upload:
        upload.write(DATA)
        upload.finish()
    umask = os.umask(0)
    os.umask(umask)
    assert store.path(HEX).stat().st_mode & 0o777 == 0o644 & ~umask
