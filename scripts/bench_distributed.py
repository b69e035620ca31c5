#!/usr/bin/env python3
"""What running distributed costs: per-token time on 2 ranks ÷ one process, on the same box, in one run.

Two servers one after the other (never both busy), each a fresh process tree, same tiny random llama, same requests:

  single  `mlx-server serve` (one process);
  group   `mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- python -m mlx_server serve --distributed`, the model
          split tensor parallel across both ranks.

Per server, after a warm-up request: --streams concurrent greedy streams of --tokens tokens each (Ollama
/api/generate); per-token time = the server's eval_duration ÷ eval_count, median over streams and --repeats runs.
For the group, /health's `distributed` block before and after gives the step plans exchanged, their mean size and
the time spent in the exchange; the exchange's share of a step = exchange seconds ÷ decode wall seconds.

For reference, the same model decoded by mlx_lm itself, with no server: `stream_generate` in one process, and under
mlx.launch on 2 ranks after `sharded_load` (one stream, --tokens tokens): its 2-rank ÷ 1-rank ratio is what tensor
parallelism alone costs on this box; what our ratio adds on top of it is the server's own distributed overhead.

On one 2-core box both ranks share the cores, so this measures overhead (the plan exchange, the all_sums inside the
sharded layers, two processes on two cores), not a speed-up: real gains need two Macs (docs/distributed.md).

    .venv/bin/python scripts/bench_distributed.py                 # ~1-2 min on 2 CPU cores
    .venv/bin/python scripts/bench_distributed.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builder, the launchers


def stream(url: str, prompt: str, tokens: int) -> dict[str, Any]:
    body = {"model": "m", "prompt": prompt, "options": {"temperature": 0, "num_predict": tokens}}
    last: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line:
                last = json.loads(line)
    if not last.get("done"):
        raise RuntimeError(f"stream ended early: {last}")
    return last


def run_streams(url: str, n: int, tokens: int, seed: int) -> tuple[list[float], float, int]:
    """n concurrent streams; per-token seconds of each, wall seconds, tokens made."""
    finals: list[dict[str, Any]] = [{}] * n

    def one(i: int) -> None:
        finals[i] = stream(url, f"run {seed} stream {i}: the river and the stone", tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    per_token = [f["eval_duration"] / 1e9 / max(1, f["eval_count"]) for f in finals]
    return per_token, wall, sum(f["eval_count"] for f in finals)


def world(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json().get("distributed", {})


def measure(name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    stream(url, "warm up", 8)
    per_token: list[float] = []
    walls = 0.0
    before = world(url)
    for rep in range(args.repeats):
        pt, wall, _ = run_streams(url, args.streams, args.tokens, rep)
        per_token += pt
        walls += wall
    after = world(url)
    out: dict[str, Any] = {"server": name, "per_token_ms": 1000 * statistics.median(per_token), "wall_s": walls}
    if before:
        plans = after["step_plans"] - before["step_plans"]
        spent = (after["exchange_ms_mean"] * after["step_plans"] - before["exchange_ms_mean"] * before["step_plans"])
        out.update(plans=plans, plan_bytes_mean=after["mean_plan_bytes"], exchange_ms_mean=spent / max(1, plans),
                   exchange_share=spent / 1000 / walls)
    return out


def raw_decode(model: str, tokens: int) -> float:
    """mlx_lm's own decode, no server: seconds per token (sharded when run under mlx.launch)."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.utils import load, sharded_load

    group = mx.distributed.init()
    loaded, tokenizer = sharded_load(model) if group.size() > 1 else load(model)
    times = []
    for _ in range(2):  # the first warms up
        last = None
        for last in stream_generate(loaded, tokenizer, "the river and the stone", max_tokens=tokens):
            pass
        assert last is not None
        times.append(1.0 / last.generation_tps)
    return times[-1]


def raw_ratio(model: Path, tokens: int, work: Path) -> tuple[float, float]:
    """(1 rank, 2 ranks) per-token seconds of mlx_lm's decode."""
    import subprocess

    from support.serving import free_port_pair

    single = raw_decode(str(model), tokens)
    out = work / "raw.json"
    subprocess.run([str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "--hosts", "127.0.0.1",
                    "-n", "2", "--starting-port", str(free_port_pair()), "--", sys.executable, __file__,
                    "--raw-rank", str(model), "--tokens", str(tokens), "--json", str(out)], check=True,
                   capture_output=True, timeout=600)
    return single, json.loads(out.read_text())["per_token_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 streams x 32 tokens, 1 repeat")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--raw-rank", type=Path, default=None, help=argparse.SUPPRESS)  # one rank of the mlx_lm baseline
    args = ap.parse_args()
    if args.raw_rank is not None:
        import mlx.core as mx

        per_token = raw_decode(str(args.raw_rank), args.tokens)
        if mx.distributed.init().rank() == 0:
            args.json.write_text(json.dumps({"per_token_s": per_token}))
        return 0
    if args.quick:
        args.streams, args.tokens, args.repeats = 2, 32, 1
    from support.serving import start_group, start_process, stop_group
    from support.tinymodels import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny", arch="llama", hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=8, num_kv_heads=4)
        models = {"m": {"source": str(model)}}
        (work / "single").mkdir()
        proc, url = start_process(work / "single", models, log=work / "single.log")
        try:
            single = measure("single", url, args)
        finally:
            proc.terminate()
            proc.wait(30)
        (work / "group").mkdir()
        group_proc, group_url = start_group(work / "group", models)
        try:
            group = measure("2 ranks", group_url, args)
        finally:
            stop_group(group_proc)
        raw_single, raw_group = raw_ratio(model, args.tokens, work)
    ratio = group["per_token_ms"] / single["per_token_ms"]
    print(f"model: random llama, hidden {args.hidden}, {args.layers} layers; {args.streams} streams x {args.tokens} "
          f"tokens x {args.repeats}")
    for r in (single, group):
        print(f"  {r['server']:8} per-token {r['per_token_ms']:7.2f} ms")
    print(f"per-token time, 2 ranks / single process: {ratio:.2f}")
    print(f"mlx_lm alone (one stream, no server): {1000 * raw_single:.2f} ms vs {1000 * raw_group:.2f} ms on 2 ranks, "
          f"ratio {raw_group / raw_single:.2f}")
    print(f"step plans: {group['plans']} exchanged, {group['plan_bytes_mean']:.0f} bytes mean, exchange "
          f"{group['exchange_ms_mean']:.2f} ms mean, {group['exchange_share']:.0%} of the decode wall time")
    if args.json:
        args.json.write_text(json.dumps({"single": single, "group": group, "ratio": ratio,
                                         "mlx_lm": {"single_s": raw_single, "two_ranks_s": raw_group}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
