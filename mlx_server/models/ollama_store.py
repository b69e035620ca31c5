"""The local Ollama store, read-only: `source: ollama:NAME[:TAG]` serves a model Ollama already pulled (no MLX here).

Layout (Ollama's server/images.go and manifest.go): the store is `$OLLAMA_MODELS` or `~/.ollama/models`; a model's
manifest is `manifests/<host>/<namespace>/<model>/<tag>` (host registry.ollama.ai and namespace library unless the
name says otherwise), JSON `{"schemaVersion": 2, "config": {...}, "layers": [{"mediaType", "digest", "size"}...]}`;
the blob of digest `sha256:<hex>` is the file `blobs/sha256-<hex>`. Layers used here, by media type
`application/vnd.ollama.image.*`: `model` (the GGUF), `params` (JSON default options, stop words among them) and
`system` (a default system prompt). The `template` layer is a Go template, which this server does not render: the
GGUF's own Jinja template, or a built-in one for the family, is used instead (mlx_server/models/chat_templates.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MEDIA_PREFIX = "application/vnd.ollama.image."
PREFIX = "ollama:"


class OllamaError(Exception):
    """The store does not hold the model, or holds it broken; the message says what and where."""


def store_root(env: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["OLLAMA_MODELS"]).expanduser() if env.get("OLLAMA_MODELS") else Path.home() / ".ollama" / "models"


@dataclass(frozen=True)
class Ref:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, name: str) -> "Ref":
        """Ollama's name rules: [host/][namespace/]model[:tag], tag `latest` by default."""
        text = name.strip().removeprefix(PREFIX)
        parts = text.split("/")
        if not text or len(parts) > 3 or not all(parts):
            raise OllamaError(f"{name!r} is not an Ollama model name ([host/][namespace/]model[:tag])")
        last, _, tag = parts[-1].partition(":")
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace = parts[0], parts[1]
        elif len(parts) == 2:
            namespace = parts[0]
        return cls(host, namespace, last, tag or "latest")

    @property
    def display(self) -> str:
        """The short form `ollama list` shows: gemma3:270m, user/model:tag, host/ns/model:tag."""
        base = f"{self.model}:{self.tag}"
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{base}"
        return base if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{base}"

    def manifest_path(self, root: Path) -> Path:
        return root / "manifests" / self.host / self.namespace / self.model / self.tag


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    name: str = ""  # tensor and json layers: the tensor's (or file's) name

    @property
    def kind(self) -> str:
        return self.media_type.removeprefix(MEDIA_PREFIX).split(";")[0].strip()

    def path(self, root: Path) -> Path:
        return root / "blobs" / self.digest.replace(":", "-")


@dataclass(frozen=True)
class Manifest:
    ref: Ref
    root: Path
    layers: tuple[Layer, ...]

    def layer(self, kind: str) -> Optional[Layer]:
        return next((layer for layer in self.layers if layer.kind == kind), None)

    def model_blob(self) -> Path:
        """The GGUF blob, checked present and complete (a size check: the digest is checked on import)."""
        layer = self.layer("model")
        if layer is None:
            kinds = ", ".join(sorted({x.kind for x in self.layers})) or "none"
            raise OllamaError(f"Ollama model {self.ref.display} has no GGUF model layer (layers: {kinds})")
        return self.checked_blob(layer)

    def checked_blob(self, layer: Layer) -> Path:
        path = layer.path(self.root)
        try:
            size = path.stat().st_size
        except OSError:
            raise OllamaError(
                f"the blob {path} of Ollama model {self.ref.display} is missing; pull it again "
                f"with `ollama pull {self.ref.display}`"
            ) from None
        if size != layer.size:
            raise OllamaError(
                f"the blob {path} of Ollama model {self.ref.display} is truncated or corrupt: "
                f"{size} bytes where the manifest says {layer.size}; pull it again with "
                f"`ollama pull {self.ref.display}`"
            )
        return path

    def text(self, kind: str) -> Optional[str]:
        layer = self.layer(kind)
        if layer is None:
            return None
        try:
            return layer.path(self.root).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def params(self) -> dict[str, Any]:
        """The params layer: Ollama option names → values (stop words as a list); {} when absent or unreadable."""
        raw = self.text("params")
        try:
            found = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return dict(found) if isinstance(found, dict) else {}


def read_manifest(name: str, root: Optional[Path] = None) -> Manifest:
    root = store_root() if root is None else root
    ref = Ref.parse(name)
    path = ref.manifest_path(root)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise OllamaError(
            f"{ref.display!r} is not in the Ollama store {root} (no {path}); pull it with "
            f"`ollama pull {ref.display}`, or point OLLAMA_MODELS at the store that has it"
        ) from None
    except (OSError, ValueError) as exc:
        raise OllamaError(f"cannot read the Ollama manifest {path}: {exc}") from None
    try:
        layers = tuple(
            Layer(str(x["mediaType"]), str(x["digest"]), int(x["size"]), str(x.get("name") or ""))
            for x in doc["layers"]
        )
    except (KeyError, TypeError, ValueError):
        raise OllamaError(f"the Ollama manifest {path} is not a model manifest") from None
    return Manifest(ref, root, layers)


def read_manifest_file(path: Path) -> Manifest:
    """The manifest at `path` (…/manifests/<host>/<namespace>/<model>/<tag> inside a store)."""
    root = path.parents[4]
    host, namespace, model, tag = path.relative_to(root / "manifests").parts
    return read_manifest(Ref(host, namespace, model, tag).display, root)


def defaults(source: str) -> tuple[dict[str, Any], Optional[str]]:
    """(default options, default system prompt) an `ollama:` source brings; nothing when it cannot be read (the
    model then fails with the store's own message when used)."""
    try:
        manifest = read_manifest(source)
    except OllamaError:
        return {}, None
    return manifest.params(), manifest.text("system")


def list_store(root: Optional[Path] = None) -> Iterator[Manifest]:
    """Every model manifest in the store, sorted by name."""
    root = store_root() if root is None else root
    base = root / "manifests"
    refs = [Ref(*path.relative_to(base).parts) for path in base.glob("*/*/*/*") if path.is_file()]
    for ref in sorted(refs, key=lambda r: r.display):
        try:
            yield read_manifest(ref.display, root)
        except OllamaError:
            continue


__all__ = [
    "Layer",
    "Manifest",
    "OllamaError",
    "PREFIX",
    "Ref",
    "defaults",
    "list_store",
    "read_manifest",
    "read_manifest_file",
    "store_root",
]
