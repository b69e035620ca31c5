"""Models created over the API (/api/create, /api/copy): a registry file in the cache dir, served beside models.yaml.

Each entry is a whole `ModelConfig` (its source, system prompt, template, options, messages, license) plus what
the registry owns for it: the directory it built (an assembled or quantized model under `cache_dir/created`, or a
GGUF import under `cache_dir/imports`) and the uploaded blobs it was made from. A copy shares its original's weights
and blobs; whatever is owned is removed with the last entry that names it, never while another entry still does,
and never a directory models.yaml points at (those entries own nothing).

The file (`cache_dir/registry.json`) is rewritten whole on every change, atomically (a temp file beside it, fsynced,
then renamed), so a crash leaves the old registry or the new one. A registry that cannot be read is set aside
(`registry.json.unreadable-<time>`), logged, and started afresh: the server still starts.

The registry is read by `ModelTable` (config/tree.py) through `models()`, which returns an immutable snapshot:
readers on any thread see one consistent set, and writers replace it whole under the lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from pydantic import ValidationError

from mlx_server.config.tree import ModelConfig

log = logging.getLogger("mlx_server.models.registry")

FILE_NAME = "registry.json"
VERSION = 1


@dataclass(frozen=True)
class Created:
    """One created (or copied) model: its config and what the registry must remove with it."""

    model: ModelConfig
    owned: Optional[Path] = None  # a directory this registry made for it (shared by its copies)
    blobs: tuple[str, ...] = ()  # hex digests of the uploaded blobs it was made from
    created_at: float = 0.0  # Unix time

    @property
    def name(self) -> str:
        return self.model.name

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.model.model_dump(mode="json", exclude_defaults=True),
            "owned": str(self.owned) if self.owned is not None else None,
            "blobs": list(self.blobs),
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> Created:
        owned = data.get("owned")
        return cls(
            model=ModelConfig.model_validate({**data["config"], "name": name}),
            owned=Path(owned) if isinstance(owned, str) else None,
            blobs=tuple(str(b) for b in data.get("blobs", ())),
            created_at=float(data.get("created_at", 0.0)),
        )


class Registry:
    """The created models of one cache dir. Thread-safe; every change is on disk before it returns."""

    def __init__(self, cache_dir: Path, blob_path: Optional[Callable[[str], Path]] = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / FILE_NAME
        # hex digest → its file: where uploaded blobs live (models/blobs.py), so removal can free them.
        self._blob_path = blob_path
        self._lock = threading.Lock()
        self._entries: Mapping[str, Created] = MappingProxyType(self._read())
        self._models: Mapping[str, ModelConfig] = self._configs(self._entries)

    @property
    def created_dir(self) -> Path:
        """Where assembled and quantized models are built."""
        return self.cache_dir / "created"

    # ---- reading (any thread, no lock: the snapshots are replaced whole) ---------------------------------------

    def models(self) -> Mapping[str, ModelConfig]:
        return self._models

    def get(self, name: str) -> Optional[Created]:
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    # ---- changes (worker threads: they write the file) ---------------------------------------------------------

    def put(self, created: Created) -> Optional[Created]:
        """Add or replace `created.name`; what it replaced is returned (its owned files are freed if unused)."""
        with self._lock:
            entries = dict(self._entries)
            previous = entries.get(created.name)
            entries[created.name] = created
            self._commit(entries)
        if previous is not None:
            self._free(previous)
        return previous

    def remove(self, name: str) -> Optional[Created]:
        """Forget `name`, then remove its directory and blobs unless another entry still uses them."""
        with self._lock:
            entries = dict(self._entries)
            gone = entries.pop(name, None)
            if gone is None:
                return None
            self._commit(entries)
        self._free(gone)
        return gone

    def in_use(self, path: Path) -> bool:
        """Whether some entry owns `path` (a directory under construction for a new entry is not yet)."""
        return any(e.owned == path for e in self._entries.values())

    # ---- internals -------------------------------------------------------------------------------------------

    def _commit(self, entries: dict[str, Created]) -> None:
        document = {"version": VERSION, "models": {name: e.to_json() for name, e in entries.items()}}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._entries = MappingProxyType(entries)
        self._models = self._configs(self._entries)

    def _free(self, gone: Created) -> None:
        """Remove what `gone` owned and nobody else uses (after the registry no longer names it)."""
        entries = self._entries
        if gone.owned is not None and not any(e.owned == gone.owned for e in entries.values()):
            if self._owns(gone.owned):
                shutil.rmtree(gone.owned, ignore_errors=True)
        if self._blob_path is not None:
            kept = {b for e in entries.values() for b in e.blobs}
            for digest in set(gone.blobs) - kept:
                self._blob_path(digest).unlink(missing_ok=True)

    def _owns(self, path: Path) -> bool:
        # Only what this registry builds lives here; a corrupt or hand-edited file must not remove anything else.
        roots = (self.created_dir.resolve(), (self.cache_dir / "imports").resolve())
        resolved = path.resolve()
        return any(resolved.is_relative_to(root) and resolved != root for root in roots)

    @staticmethod
    def _configs(entries: Mapping[str, Created]) -> Mapping[str, ModelConfig]:
        return MappingProxyType({name: e.model for name, e in entries.items()})

    def _read(self) -> dict[str, Created]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("cannot read %s (%s): created models are not served", self.path, exc)
            return {}
        try:
            document = json.loads(text)
            models = document["models"]
            return {name: Created.from_json(name, data) for name, data in models.items()}
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
            aside = self.path.with_name(f"{FILE_NAME}.unreadable-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("%s is unreadable (%s): set aside as %s; starting with no created models", self.path, exc, aside)
            return {}


__all__ = ["FILE_NAME", "Created", "Registry"]
