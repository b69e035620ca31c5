#!/usr/bin/env python3
"""How long does loading one model stall another model's token stream?

Streams from a small model while a large one loads, on the real engine, and reports the longest gap between
the small model's tokens during the load against its normal gap. Runs twice: with the engine's sliced loads
(weights evaluated between decode steps) and with the whole load done at once (what a naive server does).

    .venv/bin/python scripts/bench_load_stall.py --json stall.json
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny-model builder

from mlx_server.config.load import build_config  # noqa: E402
from mlx_server.engine.engine import Engine  # noqa: E402
from mlx_server.contract.events import Delta, Done  # noqa: E402
from mlx_server.contract.requests import GenerateRequest, LoadRequest, SamplingParams  # noqa: E402
from support.tinymodels import build_tiny_model  # noqa: E402


def measure(work: Path, small: Path, big: Path, slice_seconds: float) -> dict[str, float]:
    doc = {"server": {"memory_budget": "8GB", "cache_dir": str(work / "cache")},
           "models": {"small": {"source": str(small)}, "big": {"source": str(big)}}}
    config = build_config(yaml.safe_load(yaml.safe_dump(doc)), env={})
    engine = Engine(config, load_slice=slice_seconds)
    engine.start()
    try:
        events: "queue.Queue[tuple[float, object]]" = queue.Queue()
        req = GenerateRequest(model="small", prompt="go", raw=True, max_tokens=100000,
                              sampling=SamplingParams(temperature=0.0))
        engine.submit(req, lambda e: events.put((time.perf_counter(), e)))
        stamps: list[float] = []
        while len(stamps) < 200:  # the steady state before the load
            t, e = events.get()
            if isinstance(e, Delta):
                stamps.append(t)
        load_start = time.perf_counter()
        loaded: "queue.Queue[object]" = queue.Queue()
        engine.submit(LoadRequest("big"), loaded.put)
        during: list[float] = []
        while loaded.empty():
            t, e = events.get()
            if isinstance(e, Delta):
                during.append(t)
        load_seconds = time.perf_counter() - load_start
        engine.cancel(req.request_id)
        result = loaded.get()
        assert isinstance(result, Done), result
    finally:
        engine.stop()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    stall_gaps = [b - a for a, b in zip([load_start] + during, during)] or [load_seconds]
    return {"slice_seconds": slice_seconds, "load_seconds": load_seconds, "normal_gap_ms": 1000 * statistics.median(gaps),
            "max_gap_during_load_ms": 1000 * max(stall_gaps), "tokens_during_load": len(during)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlx-stall-"))
    small = build_tiny_model(work / "small", seed=1)
    big = build_tiny_model(work / "big", hidden_size=1536, num_layers=12, seed=2)
    size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    rows = [measure(work, small, big, 0.05), measure(work, small, big, float("inf"))]
    print(f"big model: {size / 1e9:.2f} GB of float32 weights")
    print(f"{'loads':>14}{'load s':>9}{'normal gap ms':>15}{'max gap ms':>12}{'tokens during':>15}")
    for r, label in zip(rows, ("sliced 50 ms", "all at once")):
        print(f"{label:>14}{r['load_seconds']:>9.2f}{r['normal_gap_ms']:>15.2f}{r['max_gap_during_load_ms']:>12.1f}"
              f"{r['tokens_during_load']:>15}")
    if args.json:
        args.json.write_text(json.dumps({"big_bytes": size, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
