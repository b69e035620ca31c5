"""`mlx-server import FILE.gguf|ollama:NAME` and `mlx-server ollama list`.

`ollama list` reads only manifests and GGUF headers (no MLX): what the local Ollama store holds, whether each model
can be served here (architecture, tensor types) and the models.yaml entry that serves it. `import` converts ahead of
time (the server would do it on first use), with a progress bar on a terminal, and prints the import's report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from mlx_server.models.ollama_store import PREFIX, Manifest, OllamaError, list_store, read_manifest, store_root
from mlx_server.models.ollama_tensors import files_size, is_tensor_model
from mlx_server.models.ollama_tensors import model_dir as assemble


def _bar(label: str, err: TextIO) -> Callable[[int, int], None]:
    started = time.monotonic()
    state = {"shown": -1}

    def show(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent == state["shown"]:
            return
        state["shown"] = percent
        filled = percent * 30 // 100
        rate = done / max(time.monotonic() - started, 1e-6) / 2**20
        end = "\n" if done >= total else ""
        if err.isatty() or end:  # a log file gets the finished line only
            err.write(
                f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}% "
                f"{done / 2**20:,.0f}/{total / 2**20:,.0f} MB {rate:,.0f} MB/s{end}"
            )
            err.flush()

    return show


def run_import(
    spec: str, cache: Path, name: Optional[str], out: Optional[TextIO] = None, err: Optional[TextIO] = None
) -> int:
    """Import a .gguf path or an `ollama:NAME` into the cache; print the model dir, the report, a models.yaml entry."""
    from mlx_server.convert.gguf import import_gguf, import_report, report_lines

    out, err = out or sys.stdout, err or sys.stderr
    if spec.startswith(PREFIX):
        try:
            manifest = read_manifest(spec)
            if is_tensor_model(manifest):  # safetensors layers: assembled, never converted
                assembled = assemble(manifest, cache, progress=_bar(f"assembling {manifest.ref.display}", err))
                print(
                    f"{assembled}\nadd to models.yaml:\n  {name or manifest.ref.display}:\n"
                    f"    source: {PREFIX}{manifest.ref.display}",
                    file=out,
                )
                return 0
            path = manifest.model_blob()
        except OllamaError as exc:
            print(f"Error: {exc}", file=err)
            return 1
        label, source, name = manifest.ref.display, f"{PREFIX}{manifest.ref.display}", name or manifest.ref.display
    else:
        path = Path(spec).expanduser().resolve()
        label, source = path.name, spec
    try:
        model_dir = import_gguf(path, cache, progress=_bar(f"importing {label}", err))
    except (OSError, ValueError) as exc:
        print(f"Error: importing {label} failed: {exc}", file=err)
        return 1
    for line in report_lines(import_report(model_dir)):
        print(line, file=err)
    print(model_dir, file=out)
    if name:
        print(f"add to models.yaml:\n  {name}:\n    source: {source}", file=out)
    return 0


VISION_GGUF = (
    "a vision model (GGUF + projector layer): its CLIP projector GGUF has no MLX loader here, and serving the "
    "text part alone would answer images with a 400; serve an MLX vision model from models.yaml (llava, moondream, "
    "qwen2.5vl:7b)"
)


def run_list(store: Optional[Path] = None, out: Optional[TextIO] = None) -> int:
    """The store's models as a table, then the models.yaml entries for those that can be served."""
    from mlx_server.models.gguf_file import summarize

    out = out or sys.stdout
    root = store or store_root()
    rows, servable = [], []
    for manifest in list_store(root):
        name = manifest.ref.display
        if is_tensor_model(manifest):
            rows.append(_tensor_row(manifest))
            if rows[-1][4] == "yes":
                servable.append(name)
            continue
        if manifest.layer("projector") is not None:
            rows.append((name, "-", "-", "-", "no: " + VISION_GGUF))
            continue
        try:
            blob = manifest.model_blob()  # checked against the manifest's size, so its size is the layer's
            summary = summarize(blob)
        except OllamaError as exc:
            rows.append((name, "-", "-", "-", f"no: {exc}"))
            continue
        except (OSError, ValueError) as exc:
            rows.append((name, "-", "-", "-", f"no: unreadable GGUF ({exc})"))
            continue
        types = ",".join(f"{t}x{n}" for t, n in summary.tensor_types.items())
        size = f"{blob.stat().st_size / 1e9:.2f} GB"
        rows.append(
            (
                name,
                summary.architecture,
                size,
                types,
                "yes" if summary.servable else "no: " + "; ".join(summary.problems),
            )
        )
        if summary.servable:
            servable.append(name)
    if not rows:
        print(f"no models in the Ollama store {root}", file=out)
        return 0
    header = ("NAME", "ARCH", "SIZE", "TENSOR TYPES", "SERVABLE")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(4)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4], file=out)
    if servable:
        print("\nmodels.yaml entries:\nmodels:", file=out)
        for name in servable:
            print(f"  {name}:\n    source: {PREFIX}{name}", file=out)
    return 0


def _tensor_row(manifest: Manifest) -> tuple[str, str, str, str, str]:
    """A safetensors (-mlx) model: its architecture from config.json, its quantization from the blob headers."""
    from mlx_server.models.ollama_tensors import QUANT_TYPES, describe

    name = manifest.ref.display
    try:
        found = describe(manifest)
        size = files_size(manifest)
    except (OllamaError, OSError, ValueError) as exc:
        return (name, "-", "-", "-", f"no: {exc}")
    cfg = found["config"]
    quant = cfg.get("quantization")
    kinds = next(
        (k for k, v in QUANT_TYPES.items() if quant and (v[0], v[2]) == (quant["bits"], quant["mode"])), "unquantized"
    )
    return (name, str(cfg.get("model_type", "?")), f"{size / 1e9:.2f} GB", f"safetensors {kinds}", "yes")


__all__ = ["run_import", "run_list"]
