#!/usr/bin/env python3
"""What `ollama create` costs the requests already running: /health latency and a running stream's gaps while a
model is uploaded (/api/blobs) and built with `quantize` (/api/create), ÷ the same measured just before, one run.

One server process (`python -m mlx_server --config … serve`) serves a tiny random llama as `tiny`. A greedy
/v1/chat/completions stream on it (bench_embed.Stream, read in a process of its own) and a /health probe (every
20 ms, also a process of its own) run alone for --alone seconds, then while this process uploads every file of a
bigger random float32 llama (--hidden, --layers; built here, nothing from the hub) with ollama-python's
`create_blob` and creates it with `quantize: q4_K_M` (MLX 4-bit, quantized by mlx_lm in a child process).

The server does none of that work on its event loop or inference thread (blobs are written in worker threads,
the conversion is a child process), so what remains is CPU contention: on this 2-core machine the child
process and the inference thread share the cores. Reported: /health worst and p99 latency, and the stream's
worst gap per token, alone and during the create, and their ratios.

    .venv/bin/python scripts/bench_create.py                  # hidden 1024, 8 layers (~100 M parameters)
    .venv/bin/python scripts/bench_create.py --hidden 512 --layers 4 --alone 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
from benchserve import start_server, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builder
from bench import free_port  # noqa: E402
from bench_embed import Stream  # noqa: E402
from support.tinymodels import build_tiny_model  # noqa: E402


def _probe_health(url: str, out: Any, stop: Any) -> None:
    """The probe's process: (monotonic start, seconds) of each GET /health, every 20 ms, until stopped."""
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            tic = time.monotonic()
            client.get(f"{url}/health").raise_for_status()
            out.put((tic, time.monotonic() - tic))
            time.sleep(0.02)


class HealthProbe:
    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_probe_health, args=(url, self._queue, self._stop), daemon=True)
        self.samples: list[tuple[float, float]] = []

    def start(self) -> None:
        self._proc.start()

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        while not self._queue.empty():
            self.samples.append(self._queue.get())

    def between(self, start: float, end: float) -> list[float]:
        return [s for t, s in self.samples if start <= t <= end]


def stats(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "worst_ms": float("nan"), "p99_ms": float("nan"), "median_ms": float("nan")}
    arr = np.asarray(latencies) * 1000
    return {"n": len(latencies), "worst_ms": float(arr.max()), "p99_ms": float(np.percentile(arr, 99)),
            "median_ms": float(np.median(arr))}


def per_token(stream: Stream, start: float, end: float) -> dict[str, float]:
    gaps = stream.gaps(start, end)
    if not gaps:
        return {"tokens": 0, "worst_ms": float("nan"), "median_ms": float("nan")}
    values = [g / k for g, _, k in gaps]
    return {"tokens": sum(k for _, _, k in gaps), "worst_ms": max(values) * 1000,
            "median_ms": float(np.median(values)) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--alone", type=float, default=5.0, help="seconds measured before the create")
    ap.add_argument("--quantize", default="q4_K_M")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-create-") as tmp_name:
        tmp = Path(tmp_name)
        tiny = build_tiny_model(tmp / "tiny", hidden_size=128, num_layers=2)
        big = build_tiny_model(tmp / "big", hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=max(4, args.hidden // 64), num_kv_heads=max(2, args.hidden // 256))
        weights = sum(p.stat().st_size for p in big.iterdir())
        port = free_port()
        doc = {"server": {"port": port, "memory_budget": "4GB", "cache_dir": str(tmp / "cache")},
               "models": {"tiny": {"source": str(tiny)}}}
        proc, url, log = start_server(tmp / "server", doc, port)
        try:
            httpx.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                     "options": {"num_predict": 4}}, timeout=None).raise_for_status()
            stream, probe = Stream(url), HealthProbe(url)
            stream.start()
            probe.start()
            while len(stream.times) < 5:
                time.sleep(0.05)
            alone_start = time.monotonic()
            time.sleep(args.alone)
            start = time.monotonic()
            client = ollama.Client(host=url, timeout=None)
            files = {p.name: client.create_blob(p) for p in sorted(big.iterdir()) if p.is_file()}
            uploaded = time.monotonic()
            statuses = [p.status for p in client.create(model="big-q", files=files, quantize=args.quantize,
                                                         stream=True)]
            end = time.monotonic()
            stream.stop()
            probe.stop()
            check = client.chat(model="big-q", messages=[{"role": "user", "content": "hi"}],
                                options={"num_predict": 2})
        finally:
            stop_server(proc)
    out = {
        "command": " ".join(["bench_create.py", *sys.argv[1:]]),
        "model_bytes": weights,
        "upload_s": uploaded - start,
        "create_s": end - uploaded,
        "statuses": [s for s in statuses if s and not s.startswith("using existing layer")],
        "health_alone": stats(probe.between(alone_start, start)),
        "health_during": stats(probe.between(start, end)),
        "stream_alone": per_token(stream, alone_start, start),
        "stream_during": per_token(stream, start, end),
        "stream_ended_early": stream.ended_early,
        "created_model_answers": check.eval_count is not None,
        "wall_s": time.monotonic() - wall,
        "server_log": str(log),
    }
    ha, hd, sa, sd = out["health_alone"], out["health_during"], out["stream_alone"], out["stream_during"]
    print(f"model {weights / 1e6:.0f} MB float32: upload {out['upload_s']:.1f} s, create ({args.quantize}) "
          f"{out['create_s']:.1f} s; statuses: {out['statuses']}")
    print("| | alone | during upload + create | ÷ alone |")
    print("|---|---:|---:|---:|")
    print(f"| /health worst / p99 (ms) | {ha['worst_ms']:.1f} / {ha['p99_ms']:.1f} | {hd['worst_ms']:.1f} / "
          f"{hd['p99_ms']:.1f} | {hd['worst_ms'] / ha['worst_ms']:.2f} |")
    print(f"| stream per token, median / worst (ms) | {sa['median_ms']:.1f} / {sa['worst_ms']:.1f} | "
          f"{sd['median_ms']:.1f} / {sd['worst_ms']:.1f} | {sd['median_ms'] / sa['median_ms']:.2f} |")
    print(f"health probes {ha['n']} / {hd['n']}; stream tokens {sa['tokens']} / {sd['tokens']}; "
          f"wall {out['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
