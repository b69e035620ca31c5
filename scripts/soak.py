#!/usr/bin/env python3
"""Soak: 1,000 requests against a server subprocess on 127.0.0.1; does its memory come back to where it was?

After a warm-up (every model loaded, every dialect and sampler path run once), it records the server's RSS
(psutil) and MLX's active / cache memory, runs the requests in blocks of mostly sequential and some concurrent
traffic (all dialects, stream and not, a few hang-ups), samples again
after each block, and reports the drift from start to end. Goal: < 5 % on RSS and on MLX active memory.

MLX's allocator figures come from the server's own /metrics (mlx_active_memory_bytes and friends, read on the
inference thread once per loop).

  .venv/bin/python scripts/soak.py                      # three tiny models, 1,000 requests
  .venv/bin/python scripts/soak.py --config models.yaml --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest  # noqa: E402 - the sibling script: server start-up, request bodies, outcome classification

def metric(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise KeyError(f"{name} not in /metrics")


async def sample(client: httpx.AsyncClient, proc: psutil.Process) -> dict[str, int]:
    """Memory once the server is idle, so in-flight sequences' KV caches don't count as drift."""
    for _ in range(100):
        h = (await client.get("/health")).json()
        if h["active_requests"] == 0 and h["queue_size"] == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # an idle engine refreshes its memory figures at least once a second
    text = (await client.get("/metrics")).text
    return {"rss": proc.memory_info().rss, "mlx_active": metric(text, "mlx_active_memory_bytes"),
            "mlx_cache": metric(text, "mlx_cache_memory_bytes"), "mlx_peak": metric(text, "mlx_peak_memory_bytes")}


async def soak(url: str, pid: int, models: list[str], *, requests: int, warmup: int, block: int,
               concurrent_share: float, workers: int, max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    proc = psutil.Process(pid)
    outcomes: list[loadtest.Outcome] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        dialects = [d for d, p in loadtest.ROUTES.items() if await loadtest.route_exists(client, p)]

        async def one(r: random.Random, hang_up_share: float) -> loadtest.Outcome:
            dialect, model, stream = r.choice(dialects), r.choice(models), r.random() < 0.5
            body = loadtest.make_body(dialect, model, stream, r.randint(1, max_tokens), r)
            hang_up = r.randint(1, 3) if stream and r.random() < hang_up_share else None
            return await loadtest.one_request(client, dialect, body, r.choice(loadtest.PRIORITIES), hang_up, 120.0)

        # Warm-up: each model x dialect x stream once, then random traffic until the prompt cache is at its cap.
        for model in models:
            for dialect in dialects:
                for stream in (False, True):
                    body = loadtest.make_body(dialect, model, stream, max_tokens, rng)
                    await loadtest.one_request(client, dialect, body, None, None, 120.0)
        for _ in range(warmup):
            await one(rng, 0.0)
        start = await sample(client, proc)
        series = [start]
        t0 = time.monotonic()
        done = 0
        while done < requests:
            n = min(block, requests - done)
            n_conc = int(n * concurrent_share)
            for _ in range(n - n_conc):  # sequential: one client, one request at a time
                outcomes.append(await one(rng, 0.05))
            rngs = [random.Random(rng.random()) for _ in range(workers)]
            per = [n_conc // workers + (1 if i < n_conc % workers else 0) for i in range(workers)]

            async def worker(r: random.Random, k: int) -> list[loadtest.Outcome]:
                return [await one(r, 0.05) for _ in range(k)]

            for batch in await asyncio.gather(*(worker(r, k) for r, k in zip(rngs, per, strict=True))):
                outcomes.extend(batch)
            done += n
            series.append(await sample(client, proc))
            last = {k: v / 2**20 for k, v in series[-1].items()}
            print(f"  {done:5d} requests  rss {last['rss']:7.1f} MiB  mlx active {last['mlx_active']:7.2f} MiB  "
                  f"cache {last['mlx_cache']:7.2f} MiB", flush=True)
        end = series[-1]
    kinds = {k: sum(1 for o in outcomes if o.kind == k)
             for k in ("completed", "refused", "unexpected", "lost", "disconnected")}
    drift = {k: round(100.0 * (end[k] - start[k]) / start[k], 2) if start[k] else None
             for k in ("rss", "mlx_active", "mlx_cache")}
    return {"requests": len(outcomes), **kinds, "wall_s": round(time.monotonic() - t0, 1), "dialects": dialects,
            "start": start, "end": end, "drift_percent": drift,
            "series_rss_mib": [round(s["rss"] / 2**20, 1) for s in series],
            "series_mlx_active_mib": [round(s["mlx_active"] / 2**20, 2) for s in series],
            "mlx_active_range_mib": [round(min(s["mlx_active"] for s in series) / 2**20, 2),
                                     round(max(s["mlx_active"] for s in series) / 2**20, 2)],
            "problems": [f"{o.kind} {o.dialect}: {o.detail}"
                         for o in outcomes if o.kind in ("lost", "unexpected")][:20]}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="models.yaml (default: three tiny models)")
    ap.add_argument("--tiny-dir", type=Path, help="build (or reuse) the tiny models here instead of a temp dir")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=150, help="random requests after the per-path warm-up")
    ap.add_argument("--block", type=int, default=100, help="requests between memory samples")
    ap.add_argument("--concurrent-share", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=6, help="concurrent clients in the concurrent part of a block")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompt-cache", default="0", help="own tiny server: server.prompt_cache_bytes (0: off, so the "
                    "drift is leaks only; with a cache, MLX memory plateaus near the cap and wobbles inside it)")
    ap.add_argument("--goal", type=float, default=5.0, help="allowed drift, percent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mlx-soak-") as tmp:
        work = Path(tmp)
        if args.config:
            config = loadtest.user_config(args.config)
        else:
            # The prompt cache holds KV by design and its fill level wobbles with traffic, which would read as drift.
            config = {"server": {"memory_budget": "1GB", "keep_alive": "1h", "cache_dir": str(work / "cache"),
                                 "prompt_cache_bytes": args.prompt_cache},
                      "models": loadtest.build_tiny_models(args.tiny_dir or work / "models")}
        with loadtest.server_process(config, work) as (url, pid):
            tags = httpx.get(f"{url}/api/tags", timeout=10).json()["models"]
            models = list(dict.fromkeys(m["model"] for m in tags))[:3]
            print(f"soak: {args.requests} requests against {url} (pid {pid}), models {models}", flush=True)
            result = asyncio.run(soak(url, pid, models, requests=args.requests, warmup=args.warmup, block=args.block,
                                      concurrent_share=args.concurrent_share, workers=args.workers,
                                      max_tokens=args.max_tokens, seed=args.seed))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    worst = max(abs(result["drift_percent"][k] or 0.0) for k in ("rss", "mlx_active"))
    ok = result["lost"] == 0 and result["unexpected"] == 0 and worst < args.goal
    print(f"drift rss {result['drift_percent']['rss']}%  mlx active {result['drift_percent']['mlx_active']}%  "
          f"(goal < {args.goal:g}%): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
