"""Turn a GGUF file into an MLX model directory that mlx_lm.load accepts, one slice of one tensor at a time.

The file is read with gguf-py's memory-mapped reader (never `mx.load`, which decodes K-quants wrongly and fails on
Q5_0/Q5_1/Q3_K/Q5_K). This module picks the weight format (the mode), checks the disk has room, and writes
config.json, the tokenizer (gguf_tokenizer.py) and a marker with the import's report; the weights themselves are
planned and streamed slice by slice in gguf_weights.py, so memory stays at a slice whatever the model's size.

Imports are cached under <cache_dir>/imports/<sha256 of the file>-<mode>, built in a temp dir beside it and renamed,
so a crash leaves no half model. An Ollama blob (`sha256-<hex>`) is checked against the digest in its name.
`python -m mlx_server.convert.gguf FILE.gguf CACHE_DIR` runs one import in a child process (engine/prepare/stage.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

import mlx.core as mx

from mlx_server.convert import gguf_quants as gq
from mlx_server.convert.gguf_arch import Meta, arch_of
from mlx_server.convert.gguf_tokenizer import special_ids, tokenizer_files
from mlx_server.convert.gguf_weights import Progress, plan_tensors, quantization_config, write_weights
from mlx_server.models.chat_templates import choose_template
from mlx_server.models.gguf_file import LOSSLESS_BITS, REQUANT_BITS, is_vision_tensor, open_gguf, type_support
from mlx_server.models.tmpdirs import remove_stale_tmp_dirs

# The weight format each mode name stands for: (keep quants?, float dtype for everything else).
_MODES: Mapping[str, tuple[bool, str]] = MappingProxyType(
    {
        "quantized": (True, "float16"),
        "quantized-f32": (True, "float32"),
        "dequantized": (False, "float16"),
        "dequantized-bf16": (False, "bfloat16"),
        "dequantized-f32": (False, "float32"),
    }
)
# Metal has fast quantized kernels; float16 scales are what mlx-community checkpoints ship.
_GPU_AUTO_MODE = "quantized"
# Measured with scripts/bench_gguf.py (docs/benchmarks.md): on MLX's CPU backend anything float16
# is 10-30x slower; dense bfloat16 decodes as fast as float32 (packed or dense) and prefills ~2x
# faster. Packed float32 is the fallback when dense bfloat16 would crowd out RAM: same decode
# speed at well under half the memory.
_CPU_AUTO_MODE = "dequantized-bf16"
_CPU_LOW_MEMORY_MODE = "quantized-f32"
# Dense bfloat16 is at most ~3.6x the file (16 bits per weight against Q4_0's 4.5).
_DENSE_BF16_GROWTH = 3.6
_MAX_RAM_SHARE = 0.5
_DISK_MARGIN = 256 * 2**20  # tokenizer files and slack, beyond the weights

# Bump when the output layout changes, so old imports are redone instead of reused.
_FORMAT_VERSION = 2
_MARKER = "gguf_import.json"
_BLOB_NAME = re.compile(r"sha256-([0-9a-f]{64})")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB GGUFs do not land in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_mode(mode: str, gguf_path: Path | None = None) -> str:
    """The concrete weight format for `mode`; "auto" follows the backend (and, on CPU, the RAM)."""
    if mode == "auto":
        if mx.default_device().type == mx.DeviceType.gpu:
            return _GPU_AUTO_MODE
        if gguf_path is not None:
            dense_bytes = _DENSE_BF16_GROWTH * Path(gguf_path).stat().st_size
            if dense_bytes > _MAX_RAM_SHARE * _physical_memory():
                return _CPU_LOW_MEMORY_MODE
        return _CPU_AUTO_MODE
    if mode not in _MODES:
        raise ValueError(f"unknown GGUF import mode {mode!r}; use auto or one of {sorted(_MODES)}")
    return mode


def import_gguf(gguf_path: Path, cache_dir: Path, *, mode: str = "auto", progress: Optional[Progress] = None) -> Path:
    """Convert a GGUF into an MLX model dir under cache_dir/imports, once; return the dir."""
    gguf_path = Path(gguf_path).resolve()
    resolved = resolve_mode(mode, gguf_path)
    imports = Path(cache_dir) / "imports"
    imports.mkdir(parents=True, exist_ok=True)
    digest = _cached_digest(gguf_path, imports)
    named = _BLOB_NAME.fullmatch(gguf_path.name)
    if named and named.group(1) != digest:
        raise ValueError(
            f"{gguf_path} does not match its digest (its content hashes to sha256:{digest[:12]}…): "
            "the blob is corrupt or truncated; pull the model again"
        )
    target = imports / f"{digest[:16]}-{resolved}"
    if _is_complete(target):
        return target
    remove_stale_tmp_dirs(imports, target.name)
    # Build beside the target (same filesystem) and rename, so a crash leaves only a .tmp dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=imports))
    try:
        _convert(gguf_path, tmp, resolved, progress, imports / ".tokenizers" / digest[:16])
        if _is_complete(target):  # a concurrent import finished first; keep its copy
            return target
        if target.exists():  # a half dir not made by us (no marker): replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def import_report(model_dir: Path) -> dict[str, Any]:
    """The marker an import left: mode, architecture, template in use, requantization error, skipped tensors."""
    return dict(json.loads((Path(model_dir) / _MARKER).read_text()))


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The import report as the log lines the server and the CLI print."""
    lines = [
        f"GGUF import ({report.get('architecture')}, mode {report.get('mode')}): chat template "
        f"{report.get('chat_template')}"
    ]
    for name, r in sorted((report.get("requantized") or {}).items()):
        lines.append(
            f"{name}: {r['tensors']} tensors requantized to {r['bits']}-bit groups of 32, relative RMS "
            f"error {100 * r['relative_rms_error']:.2f}% (max {r['max_abs_error']:.3g})"
        )
    if report.get("skipped_vision_tensors"):
        lines.append(f"skipped {report['skipped_vision_tensors']} vision tensors (text model only)")
    return lines


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): do not hold back
        return 1 << 62


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _is_complete(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == _FORMAT_VERSION


def _cached_digest(path: Path, imports: Path) -> str:
    # Hashing a multi-GB file takes seconds; remember it per (path, size, mtime) on disk.
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = imports / ".hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if all(saved.get(k) == v for k, v in stamp.items()):
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = file_sha256(path)
    memo.parent.mkdir(exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**stamp, "sha256": digest}))
    os.replace(tmp, memo)
    return digest


def _convert(gguf_path: Path, out: Path, mode: str, progress: Optional[Progress], tokenizer_dir: Path) -> None:
    started = time.monotonic()
    reader = open_gguf(gguf_path)
    fields = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    arch = arch_of(str(fields.get("general.architecture")))
    text = [t for t in reader.tensors if not is_vision_tensor(t.name)]
    unsupported = Counter(t.tensor_type.name for t in text if type_support(t.tensor_type.name) == "unsupported")
    if unsupported:
        listed = ", ".join(f"{name} ({n} tensors)" for name, n in sorted(unsupported.items()))
        raise ValueError(
            f"{gguf_path.name}: unsupported tensor type {listed}; supported: "
            f"{', '.join([*LOSSLESS_BITS, *REQUANT_BITS, 'F32', 'F16', 'BF16'])}"
        )
    by_name = {t.name: t for t in text}
    meta = Meta(
        fields,
        {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in text},
        lambda name: gq.dense(by_name[name].data, by_name[name].tensor_type.name),
    )
    config = arch.config(meta)
    keep_quants, dtype = _MODES[mode]
    plan = plan_tensors(text, arch, config, keep_quants, dtype)

    need = sum(e.nbytes for p in plan for e in p.entries) + _DISK_MARGIN
    free = _free_bytes(out)
    if free < need:
        raise OSError(
            f"not enough disk space in {out.parent} to import {gguf_path.name}: it needs "
            f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
        )
    # The tokenizer first: a vocabulary it cannot rebuild should fail in seconds, not after the weights.
    which, template = choose_template(
        meta.arch, fields.get("tokenizer.chat_template"), fields.get("tokenizer.ggml.tokens") or []
    )
    # Shared by every mode's import of this file; the key changes with the template (built-in ones may change).
    shared = tokenizer_dir.with_name(f"{tokenizer_dir.name}-{hashlib.sha256(template.encode()).hexdigest()[:8]}")
    tokenizer_files(fields, out, int(config["max_position_embeddings"]), template, shared)
    errors = write_weights(reader, plan, out, dtype, progress)

    config.update(special_ids(fields))
    config["torch_dtype"] = dtype
    packed = {p.module: p.bits for p in plan if p.bits is not None}
    if packed:
        config["quantization"] = quantization_config(packed)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    report = {
        "format_version": _FORMAT_VERSION,
        "source": str(gguf_path),
        "mode": mode,
        "architecture": meta.arch,
        "chat_template": which,
        "skipped_vision_tensors": len(reader.tensors) - len(text),
        "tensor_types": dict(sorted(Counter(p.type_name for p in plan).items())),
        "requantized": {
            name: {
                "bits": REQUANT_BITS[name],
                "tensors": e.tensors,
                "relative_rms_error": e.relative_rms,
                "max_abs_error": e.max_abs,
            }
            for name, e in sorted(errors.items())
        },
        "seconds": round(time.monotonic() - started, 2),
    }
    (out / _MARKER).write_text(json.dumps(report, indent=2))  # last: its presence means complete


def main(argv: list[str]) -> int:
    """`python -m mlx_server.convert.gguf FILE.gguf CACHE_DIR`: import once, print the model dir.

    The import's report goes to stderr, one line each, for the parent to log; the model dir is stdout's last line.
    """
    if len(argv) != 2:
        print("usage: python -m mlx_server.convert.gguf FILE.gguf CACHE_DIR", file=sys.stderr)
        return 2
    try:
        model_dir = import_gguf(Path(argv[0]), Path(argv[1]))
        for line in report_lines(import_report(model_dir)):
            print(line, file=sys.stderr)
        print(model_dir)
    except Exception as exc:  # noqa: BLE001 - the parent reports the last stderr line as the reason
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
