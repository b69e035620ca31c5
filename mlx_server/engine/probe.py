"""What `mlx-server doctor` asks of MLX, run in a child process (`python -m mlx_server.engine.probe ...`).

Doctor itself never imports MLX: a broken MLX install (or an x86_64 interpreter that cannot load Metal) must
become a row in its report, not a crash, and a model loaded for `--load` must give its memory back when the
child exits. Each command prints one JSON object on the last line of stdout.

  device           MLX's version, backend and device (Metal GPU name and recommended working set, or CPU)
  load CONFIG NAME load one configured model the way the server does (preparation stage, then the sliced load)
                   and report seconds and memory
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def device() -> dict[str, Any]:
    import mlx.core as mx

    metal = bool(mx.metal.is_available())
    info: dict[str, Any] = {}
    try:
        info = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in mx.device_info().items()}
    except Exception as exc:  # noqa: BLE001 - older or CPU-only builds may lack it; the rest still answers
        info = {"error": str(exc)}
    return {
        "mlx": getattr(mx, "__version__", _version("mlx")),
        "mlx_lm": _version("mlx-lm"),
        "metal": metal,
        "default_device": str(mx.default_device()),
        "device_info": info,
    }


def load(config_path: str, name: str) -> dict[str, Any]:
    import mlx.core as mx

    from mlx_server.engine.kinds import worker_factories
    from mlx_server.engine.loop.jobs import Model
    from mlx_server.engine.model.loader import ModelLoader
    from mlx_server.engine.prepare.stage import Preparer
    from mlx_server.models.config import load_config

    config = load_config(Path(config_path))
    preparer = Preparer(config, workers=1)
    try:
        loader = ModelLoader(config, preparer, worker_factories())
        started = time.perf_counter()
        job = loader.load(name)
        while not isinstance(job, Model):  # the server interleaves these slices with decode steps; alone, back to back
            try:
                next(job)
            except StopIteration as done:
                job = done.value
        loaded = job
        seconds = time.perf_counter() - started
        weights = loader.estimate(name)
        out = {
            "name": name,
            "seconds": round(seconds, 3),
            "weights": weights,
            "active": mx.get_active_memory(),
            "peak": mx.get_peak_memory(),
            "path": str(loaded.resources.path),
        }
        loader.unload(loaded)
        return out
    finally:
        preparer.close()


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["device"]:
            result = device()
        elif argv[:1] == ["load"] and len(argv) == 3:
            result = load(argv[1], argv[2])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as exc:  # noqa: BLE001 - the parent reports it as a row
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
