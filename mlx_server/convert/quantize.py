"""Quantize a float safetensors model dir with mlx_lm's own conversion: what /api/create's `quantize` runs.

`python -m mlx_server.convert.quantize SRC_DIR OUT_DIR BITS GROUP_SIZE` (models/children.py starts it): progress
lines on stderr, OUT_DIR on stdout's last line, exit 1 with the reason as stderr's last line, 2 on bad usage.

The weights and config.json come from `mlx_lm.convert.convert` (affine quantization: MLX's own quantizer, its own
choice of which layers to quantize, its config keys). Every other file of SRC_DIR is copied as it is, so the
tokenizer and chat template are the source's byte for byte (mlx_lm would re-save them through transformers, which
rewrites tokenizer_config.json). A source already quantized (config.json has "quantization" or
"quantization_config") is refused: quantizing codes again would only add error.

The model is built in a hidden dir beside OUT_DIR under the dir's lock and renamed into place (models/tmpdirs.py):
OUT_DIR is complete or absent; a killed build leaves a `.tmp-` dir, which the next build removes. SIGTERM (a
cancelled create) is turned into an exit, so the half-built dir goes with it. Only local dirs are read, with the hub
offline: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

from mlx_server.models.quantize import QuantMode
from mlx_server.models.sources import complete_model_dir, missing_parts, weights_size
from mlx_server.models.tmpdirs import building

Say = Callable[[str], None]

# Written by the conversion; every other file of the source is copied over as it is.
_CONVERTED = ("config.json", "model.safetensors.index.json")
# Weights in formats the conversion replaces: never copied (an HF repo's original/ or pytorch_model.bin).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".npz")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_USAGE = "usage: python -m mlx_server.convert.quantize SRC_DIR OUT_DIR BITS GROUP_SIZE"


def quantize_dir(src: Path, out: Path, mode: QuantMode, say: Say) -> Path:
    """Quantize the float model dir `src` into `out` (complete or absent throughout); return `out`."""
    config = _float_config(src)
    if _is_quantized_model(out):
        say(f"{out.name} is already built")
        return out
    if out.exists():  # never ours (we only rename complete dirs into place): not ours to replace
        raise FileExistsError(f"{out} exists and is not a quantized model dir; remove it")
    say(f"quantizing {src.name} ({config.get('model_type', 'unknown type')}) to {mode.label}")
    with building(out) as tmp:
        if _is_quantized_model(out):  # a concurrent build finished while we waited for the lock
            return out
        built = tmp / "model"  # mlx_lm's convert wants a dir that does not exist yet
        _convert(src, built, mode, say)
        _copy_other_files(src, built)
        if not complete_model_dir(built):
            raise RuntimeError(f"the quantized model is incomplete: {missing_parts(built)}")
        os.rename(built, out)
    say(f"quantized {src.name}: {_gib(weights_size(src))} → {_gib(weights_size(out))} of weights")
    return out


def _float_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():  # a hub id would send mlx_lm to the network; only local dirs are ours to read
        raise NotADirectoryError(f"{src} is not a model directory")
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {src / 'config.json'}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{src / 'config.json'} is not a JSON object")
    for key in ("quantization", "quantization_config"):
        if key in config:
            raise ValueError(
                f"{src.name} is already quantized ({key}: {json.dumps(config[key], sort_keys=True)[:120]}): "
                "quantize needs a float16, bfloat16 or float32 model"
            )
    if not complete_model_dir(src):
        raise ValueError(f"{src} is not a complete model dir: {missing_parts(src)}")
    return config


def _is_quantized_model(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization" in config and complete_model_dir(path)


def _convert(src: Path, built: Path, mode: QuantMode, say: Say) -> None:
    from mlx_lm.convert import convert  # deferred: pulls in transformers, after the checks that can fail fast

    # mlx_lm reports on stdout, which is ours for the result: its lines go to stderr, as progress.
    with contextlib.redirect_stdout(_Lines(say)):
        convert(str(src), str(built), quantize=True, q_group_size=mode.group_size, q_bits=mode.bits)


def _copy_other_files(src: Path, built: Path) -> None:
    """The source's own files for everything but the weights and config: its tokenizer and template exactly."""
    for written in list(built.iterdir()):
        if written.is_file() and written.name not in _CONVERTED and written.suffix != ".safetensors":
            written.unlink()  # the tokenizer as transformers re-saved it, a model card: the source's replace them
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue  # markers such as an extraction's, and dirs (their files are copied one by one)
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES or rel.as_posix() in _CONVERTED:
            continue
        (built / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, built / rel)


class _Lines:
    """A text stream that hands each complete line to `say` (mlx_lm's prints become progress lines)."""

    def __init__(self, say: Say) -> None:
        self._say = say
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *done, self._pending = self._pending.split("\n")
        for line in done:
            line = line.strip().removeprefix("[INFO] ")
            if line:
                self._say(line)
        return len(text)

    def flush(self) -> None:
        pass


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _terminated(signum: int, frame: Optional[FrameType]) -> None:
    raise SystemExit(128 + signum)  # unwinds through `building`, which removes the half-built dir


def main(argv: list[str]) -> int:
    if len(argv) != 4 or not all(a.isdigit() for a in argv[2:]):
        print(_USAGE, file=sys.stderr)
        return 2
    try:
        mode = QuantMode(int(argv[2]), int(argv[3]))
    except ValueError as exc:
        print(f"{_USAGE}\n{exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    # Before mlx_lm (and huggingface_hub, which reads it on import) loads: a local dir must never become a download.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        out = quantize_dir(Path(argv[0]), Path(argv[1]), mode, _stderr)
    except Exception as exc:  # noqa: BLE001 - the parent reports the last stderr line as the reason
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
