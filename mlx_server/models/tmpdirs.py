"""Leftovers of directories built beside their target and renamed into place (zip extraction, Ollama tensor
assembly, GGUF import, created models): sources.py, ollama_tensors.py, convert/gguf.py, assemble.py and
convert/quantize.py all build that way, so the clean-up lives apart from each of them.

Two ways to tell a leftover from a build still running. `remove_stale_tmp_dirs` goes by age (an hour-old one is
not running). `building` holds a lock on the target's parent dir for the whole build, so whoever holds that lock
knows every `.tmp-NAME-<8 hex>` beside NAME is a leftover, whatever its age: a crashed or killed build's dir is
removed by the next build (or by `remove_leftovers`, which the parent of a killed child calls). The lock is
flock(2) on the directory itself (no lock file left behind); the kernel drops it when its holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STALE_AFTER = 3600.0  # seconds: a build older than this is an interrupted one, not a concurrent one still running


def remove_stale_tmp_dirs(parent: Path, name: str) -> None:
    """Interrupted extractions and imports leave `.tmp-NAME-*` dirs; an hour-old one is not a concurrent one still
    running."""
    cutoff = time.time() - STALE_AFTER
    for leftover in parent.glob(f".tmp-{name}-*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # another process cleaned it up first


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """A fresh hidden dir beside `target` to build it in, removed on the way out (moved into place or not).

    Holds the parent dir's lock throughout (builds of targets in one dir wait for each other), so the leftovers of
    earlier builds of `target` are removed first. Where the filesystem cannot lock, only hour-old ones are.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # e.g. some network filesystems: build unlocked, as the other builders here do
            locked = False
        if locked:
            _remove_own_leftovers(target)
        else:
            remove_stale_tmp_dirs(parent, target.name)
        tmp = parent / f".tmp-{target.name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(target: Path) -> bool:
    """Remove what killed builds of `target` left, unless a build in its dir is running now (never waits).

    True when the dir was free and the leftovers are gone."""
    try:
        fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                remove_stale_tmp_dirs(target.parent, target.name)
            return False
        _remove_own_leftovers(target)
        return True
    finally:
        os.close(fd)


def _remove_own_leftovers(target: Path) -> None:
    # Exactly `building`'s names: a plain `.tmp-NAME-*` glob would also match the builds of "NAME-4bit".
    own = re.compile(re.escape(f".tmp-{target.name}-") + "[0-9a-f]{8}")
    for leftover in target.parent.iterdir():
        if own.fullmatch(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


__all__ = ["STALE_AFTER", "building", "remove_leftovers", "remove_stale_tmp_dirs"]
