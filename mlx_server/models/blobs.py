"""Uploaded blobs (the files `ollama create` names by digest): content-addressed files under `cache_dir/blobs`,
named as Ollama names them, `sha256-<hex>`.

An upload is written to a hidden partial file beside its target (`.sha256-<hex>.<random>.partial`), hashed as it
is written, and renamed into place only once its digest is the one its name promises. So a file under a final name
is always whole and correct, a failed upload (digest mismatch, too large, disk full, the client gone) leaves
nothing, and two identical uploads at once are harmless: each renames its own whole copy over the other's. A
writer holds an advisory lock on its partial file for as long as it writes, so opening a store removes the partial
files a crashed server left (unlocked) while never touching another process's upload in progress (locked).

No MLX and no HTTP here: api/blobs.py streams request bodies in, and model creation reads `path(hexdigest)`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Callable, Iterator, Optional

from mlx_server.contract.errors import BadRequest, InsufficientStorage, PayloadTooLarge

log = logging.getLogger("mlx_server.models.blobs")

# Ollama's form in URLs is `sha256:<hex>`; its files (and so some clients' digests) use `sha256-<hex>`.
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
_PARTIAL_GLOB = ".sha256-*.partial"
# Kept free beyond the blob itself, so an upload never fills the disk the registry, imports and logs live on.
SPACE_MARGIN = 256 * 2**20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class BadDigest(BadRequest, ValueError):
    """Not a `sha256:<64 hex digits>` digest (a ValueError too, for callers that only parse)."""


class DigestMismatch(BadRequest):
    def __init__(self, expected: str, got: str) -> None:
        # Ollama's wording, so clients and operators read the same message from either server.
        super().__init__(f'digest mismatch, expected "sha256:{expected}", got "sha256:{got}"')
        self.expected = expected
        self.got = got


class TooLarge(PayloadTooLarge):
    """The upload is (or announced it would be) larger than the store takes."""


class NoSpace(InsufficientStorage):
    """Not enough free disk space for the upload, found before it started or while it was written."""


def parse_digest(text: str) -> str:
    """The lowercase hex of `sha256:<hex>` (or Ollama's file form `sha256-<hex>`); BadDigest otherwise."""
    found = _DIGEST.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        shown = text[:100] if isinstance(text, str) else repr(text)
        raise BadDigest(f'invalid digest format: expected "sha256:" and 64 hex digits, got "{shown}"')
    return found.group(1).lower()


def disk_free(path: Path) -> int:
    """Bytes free to this process on the filesystem holding `path`."""
    return shutil.disk_usage(path).free


def _checked_hex(hexdigest: str) -> str:
    # Every path is built from a checked digest, so no caller can name a file outside the store.
    hexdigest = hexdigest.lower()
    if not _HEX.fullmatch(hexdigest):
        raise BadDigest(f'invalid digest: expected 64 hex digits, got "{hexdigest[:100]}"')
    return hexdigest


def _lock(fd: int, *, wait: bool) -> bool:
    """Take the advisory lock on an open file: False when another holder has it. A filesystem without locks
    counts as locked by someone, so nothing that might be in use is ever removed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


class BlobStore:
    """The blobs under `root` (`config.server.cache_dir / "blobs"`, created on the first upload)."""

    def __init__(
        self,
        root: Path,
        free_space: Callable[[Path], int] = disk_free,
        *,
        max_bytes: Optional[int] = None,
        margin: int = SPACE_MARGIN,
    ) -> None:
        self.root = Path(root)
        self.free_space = free_space  # a seam: tests stand in a full disk
        self.max_bytes = max_bytes  # None: no limit but the disk
        self.margin = margin
        self.sweep()

    def path(self, hexdigest: str) -> Path:
        """Where the blob with this sha256 is (or would be) stored."""
        return self.root / f"sha256-{_checked_hex(hexdigest)}"

    def exists(self, hexdigest: str) -> bool:
        return self.path(hexdigest).is_file()

    def upload(self, hexdigest: str, size: Optional[int] = None) -> Upload:
        """Start writing the blob `hexdigest`; `size` is what the client announced, if it did.

        Refuses before any byte is written when the announced size is over `max_bytes` (TooLarge) or does not fit
        the free space with the margin (NoSpace)."""
        hexdigest = _checked_hex(hexdigest)
        if size is not None and self.max_bytes is not None and size > self.max_bytes:
            raise self.too_large()
        self.root.mkdir(parents=True, exist_ok=True)
        self.check_space(size or 0)
        return Upload(self, hexdigest, size)

    def check_space(self, needed: int) -> None:
        free = self.free_space(self.root)
        if free < needed + self.margin:
            raise NoSpace(
                f"not enough disk space for the blob: {free} bytes free in {self.root}, "
                f"{needed + self.margin} needed ({needed} for the blob and {self.margin} kept free)"
            )

    def too_large(self) -> TooLarge:
        return TooLarge(f"blob larger than the limit of {self.max_bytes} bytes (server.max_blob_bytes)")

    def sweep(self) -> int:
        """Remove the partial files no writer holds (a crashed server's); returns how many were removed."""
        removed = 0
        if not self.root.is_dir():
            return removed
        for partial in self.root.glob(_PARTIAL_GLOB):
            try:
                fd = os.open(partial, os.O_RDONLY)
            except OSError:
                continue  # gone already: its writer finished or gave up
            try:
                if _lock(fd, wait=False):
                    partial.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d unfinished blob upload(s) left in %s", removed, self.root)
        return removed


class Upload:
    """One blob being written: `write` its bytes in order, then `finish`. Any failure, or `abort` (idempotent, also
    what leaving a `with` block without finishing does), removes the partial file. Safe to call from worker
    threads: calls are serialized, so an abort waits for a write still running."""

    def __init__(self, store: BlobStore, hexdigest: str, size: Optional[int]) -> None:
        self.store = store
        self.hexdigest = hexdigest
        self.size = size
        self.written = 0
        self.target = store.path(hexdigest)
        self._hash = hashlib.sha256()
        self._mutex = threading.Lock()
        self._settled = False  # finished or aborted: nothing more may be written
        self.partial, fd = _create_partial(store.root, hexdigest)
        self._out: BinaryIO = os.fdopen(fd, "wb")

    @property
    def settled(self) -> bool:
        return self._settled

    def write(self, data: bytes) -> None:
        with self._mutex:
            if self._settled:
                raise RuntimeError("write to a finished or aborted upload")
            with self._failing():
                limit = self.store.max_bytes
                if limit is not None and self.written + len(data) > limit:
                    raise self.store.too_large()
                # Checked per write, not just at the start: other writers share the disk.
                left = self.size - self.written if self.size is not None else 0
                self.store.check_space(max(left, len(data)))
                self._out.write(data)
                self._hash.update(data)
                self.written += len(data)

    def finish(self) -> Path:
        """Verify the digest and move the blob into place under its final name; returns that path."""
        with self._mutex:
            if self._settled:
                raise RuntimeError("finish of a finished or aborted upload")
            with self._failing():
                self._out.flush()
                os.fsync(self._out.fileno())
                got = self._hash.hexdigest()
                if got != self.hexdigest:
                    raise DigestMismatch(self.hexdigest, got)
                # Renamed while still open and locked: a sweep never sees it unlocked under the partial name.
                os.replace(self.partial, self.target)
                self._settled = True
                self._out.close()
            _sync_dir(self.store.root)
            return self.target

    def abort(self) -> None:
        with self._mutex:
            self._discard()

    def _discard(self) -> None:
        if self._settled:
            return
        self._settled = True
        with contextlib.suppress(OSError):
            self.partial.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._out.close()  # closing drops the lock, after the unlink: a sweep never meets a live partial

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        try:
            yield None
        except OSError as exc:
            self._discard()
            if exc.errno in _DISK_FULL:
                raise NoSpace(f"the disk filled up while writing the blob ({self.written} bytes written)") from exc
            raise
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self, kind: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.abort()


def _create_partial(root: Path, hexdigest: str) -> tuple[Path, int]:
    """A new partial file, open and locked. Between its creation and the lock, another store's sweep may take it
    for a crashed upload's and remove it; a file whose name no longer leads to it is then made again."""
    for _ in range(8):
        partial = root / f".sha256-{hexdigest}.{secrets.token_hex(8)}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _lock(fd, wait=True)
        try:
            if os.stat(partial).st_ino == os.fstat(fd).st_ino:
                return partial, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, f"could not create an upload file in {root}: each was removed at once")


def _sync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every platform can fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = [
    "SPACE_MARGIN",
    "BadDigest",
    "BlobStore",
    "DigestMismatch",
    "NoSpace",
    "TooLarge",
    "Upload",
    "disk_free",
    "parse_digest",
]
