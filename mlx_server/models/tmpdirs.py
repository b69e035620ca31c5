"""Leftovers of directories built beside their target and renamed into place (zip extraction, Ollama tensor
assembly, GGUF import): sources.py, ollama_tensors.py and convert/gguf.py all build that way, so the clean-up
lives apart from each of them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

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


__all__ = ["STALE_AFTER", "remove_stale_tmp_dirs"]
