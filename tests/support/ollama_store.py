"""A fake Ollama store on disk, laid out as Ollama writes it: manifests/<host>/<ns>/<model>/<tag> and
blobs/sha256-<hex>."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

MEDIA = "application/vnd.ollama.image."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def add_blob(root: Path, data: bytes | Path, digest: Optional[str] = None) -> dict[str, Any]:
    """Store bytes (or a file: hard-linked when possible, it may be large) as a blob; returns its layer entry."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        digest = digest or _sha256(data)
        target = blobs / f"sha256-{digest}"
        if not target.exists():
            try:
                os.link(data, target)
            except OSError:
                shutil.copyfile(data, target)
        size = data.stat().st_size
    else:
        digest = digest or hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        size = len(data)
    return {"digest": f"sha256:{digest}", "size": size}


def add_model(root: Path, name: str, gguf: Path, *, params: Optional[dict[str, Any]] = None,
              system: Optional[str] = None, template: Optional[str] = None, digest: Optional[str] = None,
              host: str = "registry.ollama.ai", namespace: str = "library",
              projector: Optional[bytes] = None) -> Path:
    """A manifest for `name` (model:tag) with a model layer and the optional params/system/template layers."""
    model, _, tag = name.partition(":")
    layers = [{"mediaType": MEDIA + "model", **add_blob(root, gguf, digest)}]
    if projector is not None:  # a vision model's CLIP projector GGUF (llava, moondream)
        layers.append({"mediaType": MEDIA + "projector", **add_blob(root, projector)})
    if params is not None:
        layers.append({"mediaType": MEDIA + "params", **add_blob(root, json.dumps(params).encode())})
    if system is not None:
        layers.append({"mediaType": MEDIA + "system", **add_blob(root, system.encode())})
    if template is not None:
        layers.append({"mediaType": MEDIA + "template", **add_blob(root, template.encode())})
    config = {"mediaType": "application/vnd.docker.container.image.v1+json",
              **add_blob(root, b'{"model_format":"gguf"}')}
    path = root / "manifests" / host / namespace / model / (tag or "latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "config": config, "layers": layers}))
    return path
