"""Ollama's safetensors models (the `-mlx` tags, served by Ollama's MLX runner) as mlx_lm model directories.

Such a manifest has no GGUF: each `application/vnd.ollama.image.tensor` layer is a small safetensors file holding one
tensor by its Hugging Face name (or one layer's experts packed together), and `application/vnd.ollama.image.json`
layers hold config.json, tokenizer.json and the like under their file names. A quantized tensor keeps MLX's own
layout — packed uint32 weights, per-group scales and (affine modes) biases — but names them `W.scale` / `W.bias`
beside `W` (`...proj.weight`), with `quant_type` and `group_size` in the blob's metadata; mlx_lm wants
`...proj.scales` / `...proj.biases` and a `quantization` entry in config.json. So a model directory is assembled
once per manifest in the cache: blobs whose names need no change are linked, the others rewritten with the new
header and the same data bytes, every blob checked against its digest on the way; nothing is dequantized.
No MLX here: headers are JSON, data is copied as bytes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Optional

from mlx_server.models.ollama_store import Layer, Manifest, OllamaError
from mlx_server.models.tmpdirs import remove_stale_tmp_dirs

# Ollama's quant_type → MLX (bits, default group size, mode); the group size in the blob's metadata wins.
QUANT_TYPES = {
    "int4": (4, 32, "affine"),
    "int8": (8, 64, "affine"),
    "nvfp4": (4, 16, "nvfp4"),
    "mxfp8": (8, 32, "mxfp8"),
}
COMPLETE = ".complete"
DISK_MARGIN = 64 << 20
Progress = Callable[[int, int], None]


def is_tensor_model(manifest: Manifest) -> bool:
    return any(layer.kind == "tensor" for layer in manifest.layers)


def files_size(manifest: Manifest) -> int:
    """Bytes of the tensor and JSON blobs, each checked present and complete (raises OllamaError)."""
    return sum(
        manifest.checked_blob(layer).stat().st_size for layer in manifest.layers if layer.kind in ("tensor", "json")
    )


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise OllamaError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise OllamaError(f"{path} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise OllamaError(f"{path} has an unreadable safetensors header: {exc}") from None
    return header, 8 + size


def mlx_names(header: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(old → new tensor names, module → its quantization) for one blob's header (its metadata left out)."""
    meta = header.get("__metadata__") or {}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    quant_type = meta.get("quant_type")
    renames: dict[str, str] = {}
    quants: dict[str, dict[str, Any]] = {}
    for name, info in tensors.items():
        if info.get("dtype") != "U32" or f"{name}.scale" not in tensors:
            continue  # not a packed quantized weight
        if quant_type not in QUANT_TYPES:
            raise OllamaError(
                f"tensor {name} is quantized as {quant_type!r}, which MLX cannot load (known: {', '.join(QUANT_TYPES)})"
            )
        bits, group, mode = QUANT_TYPES[quant_type]
        group = int(meta.get("group_size") or group)
        module = name.removesuffix(".weight")
        renames[f"{name}.scale"] = f"{module}.scales"
        if f"{name}.bias" in tensors:
            renames[f"{name}.bias"] = f"{module}.biases"
        quants[module] = {"group_size": group, "bits": bits, "mode": mode}
    return renames, quants


def model_dir(manifest: Manifest, cache_dir: Path, progress: Optional[Progress] = None) -> Path:
    """The mlx_lm directory of a tensor-layer model, assembled on first use (atomically; a second call reuses it)."""
    tensors = [layer for layer in manifest.layers if layer.kind == "tensor"]
    jsons = [layer for layer in manifest.layers if layer.kind == "json"]
    if not any(layer.name == "config.json" for layer in jsons):
        raise OllamaError(f"Ollama model {manifest.ref.display} has tensor layers but no config.json layer")
    key = hashlib.sha256("".join(layer.digest for layer in manifest.layers).encode()).hexdigest()[:16]
    out = cache_dir / "ollama-mlx" / f"{manifest.ref.model}-{manifest.ref.tag}-{key}".replace("/", "_")
    if (out / COMPLETE).is_file():
        return out
    total = files_size(manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + DISK_MARGIN:
        raise OllamaError(
            f"not enough disk in {out.parent} to assemble Ollama model {manifest.ref.display}: it "
            f"needs {total / 1e9:.2f} GB, {free / 1e9:.2f} GB is free"
        )
    remove_stale_tmp_dirs(out.parent, out.name)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _assemble(manifest, tmp, tensors, jsons, total, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out)
    except OSError:  # assembled meanwhile by another process: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / COMPLETE).is_file():
            raise
    return out


def _assemble(
    manifest: Manifest, tmp: Path, tensors: list[Layer], jsons: list[Layer], total: int, progress: Optional[Progress]
) -> None:
    done = 0
    quantization: dict[str, dict[str, Any]] = {}
    for index, layer in enumerate(tensors):
        blob = manifest.checked_blob(layer)
        header, start = read_header(blob)
        renames, quants = mlx_names(header)
        quantization.update(quants)
        target = tmp / f"model-{index + 1:05d}-of-{len(tensors):05d}.safetensors"
        _copy(layer, blob, target, header, start, renames)
        done += layer.size
        if progress is not None:
            progress(done, total)
    for layer in jsons:
        name = Path(layer.name)
        if name.name != layer.name or name.name.startswith("."):
            continue  # a draft model's or nested file: not part of this model directory
        _copy(layer, manifest.checked_blob(layer), tmp / name.name, None, 0, {})
    config = json.loads((tmp / "config.json").read_text())
    if quantization:
        config["quantization"] = {**_most_common(quantization), **quantization}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / COMPLETE).write_text(manifest.ref.display)


def _copy(
    layer: Layer, blob: Path, target: Path, header: Optional[dict[str, Any]], start: int, renames: dict[str, str]
) -> None:
    """Write `blob` to `target` (its header renamed when asked), checking its digest as the bytes go by."""
    digest = hashlib.sha256()
    with open(blob, "rb") as src, open(target, "wb") as dst:
        if renames and header is not None:
            head = src.read(start)
            digest.update(head)
            new = json.dumps({renames.get(k, k): v for k, v in header.items()}).encode()
            new += b" " * (-len(new) % 8)  # the data stays 8-byte aligned
            dst.write(struct.pack("<Q", len(new)) + new)
        while chunk := src.read(8 << 20):
            digest.update(chunk)
            dst.write(chunk)
    if f"sha256:{digest.hexdigest()}" != layer.digest:
        target.unlink(missing_ok=True)
        raise OllamaError(
            f"the blob {blob} does not match its digest {layer.digest}: it is corrupt; pull the model "
            "again with `ollama pull`"
        )


def describe(manifest: Manifest) -> dict[str, Any]:
    """config.json (with the quantization the tensors carry) and tokenizer_config.json, read from the blobs alone."""
    docs: dict[str, Any] = {}
    for layer in manifest.layers:
        if layer.kind == "json" and layer.name in ("config.json", "tokenizer_config.json"):
            docs[layer.name] = json.loads(manifest.checked_blob(layer).read_text())
    config = dict(docs.get("config.json") or {})
    quants: dict[str, dict[str, Any]] = {}
    for layer in manifest.layers:
        if layer.kind == "tensor":
            quants.update(mlx_names(read_header(manifest.checked_blob(layer))[0])[1])
    if quants:
        config["quantization"] = _most_common(quants)
    return {"config": config, "tokenizer_config": docs.get("tokenizer_config.json") or {}}


def _most_common(quants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The quantization most modules share: config.json's default (the others get entries of their own)."""
    common = collections.Counter(json.dumps(q, sort_keys=True) for q in quants.values()).most_common(1)
    return dict(json.loads(common[0][0]))


__all__ = ["QUANT_TYPES", "describe", "files_size", "is_tensor_model", "mlx_names", "model_dir", "read_header"]
