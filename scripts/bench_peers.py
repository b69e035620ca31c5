#!/usr/bin/env python3
"""Our server against the MLX peers (issue 26): same model files, same requests, one server at a time.

Peers (scripts/peers.py builds one venv each, once, cached under ~/.cache/mlx-server/bench-peers, and says what each
needed): `mlx_lm.server` (our pinned mlx-lm), vllm-mlx (--continuous-batching), mlx-openai-server, mlx-omni-server.
Every server gets the same tiny random llamas (built here, float32, greedy decoding) and the same prompts (exact
token counts, built with the models' shared tokenizer). Per round, every server in turn (the order rotated each
round), each phase a fresh process:

  decode phase, on the DECODE model (default hidden 512, 8 layers: ~25M parameters, compute-bound on 2 cores):
  1. aggregate tok/s at 1 / 4 / 8 concurrent streams on /v1/chat/completions (ours: also on Ollama's /api/chat);
  prefill phase, on the PREFILL model (default hidden 256, 4 layers: MLX's CPU backend prefills the decode model
  at ~35 tok/s, so a 1,500-token prompt would take 40 s there and the per-request overheads disappear in it):
  2. mixed load (scripts/bench_latency.py's metrics): a decoding stream's worst gap during a LONG-token prefill ÷
     that prefill's TTFT, and a short request's TTFT sent 0.3 s behind a long one ÷ its TTFT alone;
  3. follow-up turn: a LONG-token first turn, then the conversation plus a question, max_tokens 1: its TTFT;
     and after the rounds, paired (--pairs, default 8): ours and each peer up at once, their follow-up turns
     alternated, the per-pair ratio's median (on a shared 2-core machine the sequential figure drifts by more than
     the difference it measures); and, with --tps-pairs N, tok/s the same way: bursts of 1 and 8 streams
     (--tps-levels) alternated between ours and each peer, the per-pair ratio's median;
  4. peak RSS of the server's process tree (during the 8 streams, and over the decode phase's requests that every
     server gets: ours then also serves the Ollama route, whose stored prompt caches would count against it alone);
  5. the CPU other processes used meanwhile (cores): figures from a busy machine are not comparable.

The table shows medians over rounds and ours ÷ each peer (for tok/s higher is better for us; for times, RSS and
ratios lower is). A peer that cannot be built or run is reported with its error and the run goes on.

    .venv/bin/python scripts/bench_peers.py                       # ~35 min on 2 cores (3 rounds, 8 pairs)
    .venv/bin/python scripts/bench_peers.py --rounds 1 --quick    # smoke-sized
    .venv/bin/python scripts/bench_peers.py --servers ours,mlx_lm.server --json peers.json
    .venv/bin/python scripts/bench_peers.py --build-only [--smoke]  # the venvs only (and one stream each)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builder
import bench_latency as lat  # noqa: E402
import peer_metrics as pm  # noqa: E402
import peers  # noqa: E402

OURS = "ours"


def start_ours(model: Path, work: Path, ctx: int, port: int) -> pm.Target:
    log = work / "ours.log"
    cfg = work / "ours.yaml"
    server = {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "ours-cache")}
    cfg.write_text(yaml.safe_dump({"server": server, "models": {
        "bench": {"source": str(model), "keep_alive": -1, "context_length": ctx}}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_server", "--config", str(cfg), "--log-level", "warning", "serve"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    return pm.Target(OURS, peers.url_of(port), "bench", proc, log, ollama=True)


def start(name: str, model: Path, work: Path, ctx: int, cache: Path) -> pm.Target:
    port = peers.free_port()
    if name == OURS:
        t = start_ours(model, work, ctx, port)
    else:
        log = work / f"{name}.log"
        proc = peers.start(name, model, port, log, cache=cache)
        t = pm.Target(name, peers.url_of(port), peers.model_id(name, model), proc, log)
    peers.ready(t.url, t.proc, timeout=peers.RECIPES[name].ready_timeout_s if name in peers.RECIPES else 180,
                peer=name, log=t.log)
    return t


def med(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rounds: list[dict[str, Any]], levels: tuple[int, ...]) -> dict[str, Optional[float]]:
    ok = [r for r in rounds if "error" not in r]
    row: dict[str, Optional[float]] = {}
    for route in ("openai", "ollama"):
        for n in levels:
            row[f"tps_{route}_{n}"] = med([r[f"tps_{route}_{n}"]["tps"] for r in ok if f"tps_{route}_{n}" in r])
    row["stall_ratio"] = med([r["stall"]["ratio"] for r in ok])
    row["short_ratio"] = med([r["short"]["ratio"] for r in ok])
    row["followup_ms"] = med([1000 * f["ttft_s"] for r in ok for f in r["followup"]])
    row["rss_streams_mb"] = med([r["rss_streams_mb"] for r in ok])
    row["peak_rss_mb"] = med([r["peak_rss_mb"] for r in ok])  # the decode phase's, over the requests all get
    row["other_cores"] = med([r["other_cores"] for r in ok])
    return row


LOWER_IS_BETTER = {"stall_ratio", "short_ratio", "followup_ms", "rss_streams_mb", "peak_rss_mb"}


def table(rows: dict[str, dict[str, Optional[float]]], names: list[str], levels: tuple[int, ...]) -> str:
    metrics = [(f"tps_openai_{n}", f"tok/s, {n} stream(s), /v1/chat/completions") for n in levels]
    metrics += [(f"tps_ollama_{n}", f"tok/s, {n} stream(s), ours on /api/chat") for n in levels]
    metrics += [("stall_ratio", "worst stream gap during a prefill / its TTFT"),
                ("short_ratio", "short TTFT behind a long prompt / alone"),
                ("followup_ms", "follow-up turn TTFT, ms"),
                ("rss_streams_mb", "peak RSS during 8 streams, MB"),
                ("peak_rss_mb", "peak RSS over the decode phase (the same requests for all), MB"),
                ("other_cores", "other processes' CPU meanwhile, cores")]
    peers_ = [n for n in names if n != OURS]
    head = ["metric", *names, *(f"ours÷{p}" for p in peers_)]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]

    def fmt(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    for key, label in metrics:
        vals = [rows.get(n, {}).get(key) for n in names]
        if all(v is None for v in vals):
            continue
        ours = rows.get(OURS, {}).get(key)
        if key.startswith("tps_ollama"):
            ours_for_ratio, peer_key = ours, key.replace("ollama", "openai")
        else:
            ours_for_ratio, peer_key = ours, key
        ratios = []
        for p in peers_:
            pv = rows.get(p, {}).get(peer_key)
            ratios.append("-" if not pv or ours_for_ratio is None or key == "other_cores"
                          else f"{ours_for_ratio / pv:.2f}")
        lines.append(" | ".join([label, *map(fmt, vals), *ratios]))
    return "\n".join(lines)


def versions(names: list[str], cache: Path) -> dict[str, str]:
    out = {"mlx": metadata.version("mlx"), "mlx-lm": metadata.version("mlx-lm")}
    for n in names:
        if n in peers.RECIPES:
            rec = peers.venv_dir(n, cache) / "peer-build.json"
            if rec.exists():
                out[n] = json.loads(rec.read_text())["version"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-only", action="store_true", help="build the peers' venvs and stop")
    ap.add_argument("--smoke", action="store_true", help="with --build-only: start each peer, stream one chat")
    ap.add_argument("--servers", "--peers", dest="servers", default=",".join([OURS, *peers.RECIPES]),
                    help="comma-separated (default: ours and every peer)")
    ap.add_argument("--cache", type=Path, default=peers.DEFAULT_CACHE)
    ap.add_argument("--force", action="store_true", help="rebuild the venvs even when their recipes match")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-model", default="512x8", help="HIDDENxLAYERS of the decode phase's model")
    ap.add_argument("--prefill-model", default="256x4", help="HIDDENxLAYERS of the prefill phase's model")
    ap.add_argument("--long", type=int, default=1500, help="tokens of the long prompt and the follow-up's first turn")
    ap.add_argument("--pairs", type=int, default=8, help="paired follow-up turns per peer (0: none)")
    ap.add_argument("--tps-pairs", type=int, default=0,
                    help="paired tok/s bursts per level and peer, after the rounds (0: none)")
    ap.add_argument("--tps-levels", default="1,8", help="stream counts of the paired tok/s bursts")
    ap.add_argument("--quick", action="store_true", help="short prompts and streams (a smoke run, not figures)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [n for n in args.servers.split(",") if n]
    unknown = [n for n in names if n != OURS and n not in peers.RECIPES]
    if unknown:
        ap.error(f"unknown server(s) {unknown}; known: {[OURS, *peers.RECIPES]}")
    peer_names = [n for n in names if n != OURS]
    built, failed = peers.build_and_smoke(peer_names, cache=args.cache, force=args.force,
                                          smoke_test=args.build_only and args.smoke)
    if args.build_only:
        if args.json:
            args.json.write_text(json.dumps(built, indent=2))
        if failed:
            print(f"\n{len(failed)} peer(s) failed: {', '.join(failed)}")
        return 1 if failed else 0

    plan = pm.Plan(long=args.long, followup_size=args.long)
    if args.quick:
        plan = pm.Plan(stream_tokens=24, long=300, followups=1, followup_size=300, delay=0.1)
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from support.tinymodels import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="mlx-bench-peers-"))
    models: dict[str, Path] = {}
    described: dict[str, dict[str, Any]] = {}
    for phase, spec in (("decode", args.decode_model), ("prefill", args.prefill_model)):
        hidden, layers = (int(x) for x in spec.lower().split("x"))
        models[phase] = build_tiny_model(work / f"model-{spec}", hidden_size=hidden, num_layers=layers,
                                         num_heads=max(4, hidden // 64), num_kv_heads=max(2, hidden // 128),
                                         max_position_embeddings=plan.ctx, seed=0)
        params = sum(v.size for v in mx.load(str(models[phase] / "model.safetensors")).values())  # type: ignore
        described[phase] = {"hidden": hidden, "layers": layers, "params": params, "path": str(models[phase])}
        print(f"{phase} model: random llama, hidden {hidden}, {layers} layers, {params / 1e6:.1f}M parameters, "
              "float32")
    prompts = lat.Prompts(load_tokenizer(models["decode"]))  # both models have the same tokenizer
    vers = versions(names, args.cache)
    print(f"logs in {work}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    for n in names:
        lat.SERVERS.setdefault(n, n)  # bench_latency's metrics name servers by key in their errors

    runnable = [n for n in names if n not in failed]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in runnable}
    errors: dict[str, str] = {n: built[n]["error"] for n in failed}
    t_all = time.perf_counter()
    for rnd in range(args.rounds):
        order = runnable[rnd % len(runnable):] + runnable[: rnd % len(runnable)] if runnable else []
        for name in order:
            print(f"round {rnd + 1}/{args.rounds}, {name}:", flush=True)
            t0 = time.perf_counter()
            res: dict[str, Any] = {}
            for phase, measure in (("decode", pm.measure_decode), ("prefill", pm.measure_prefill)):
                target = None
                try:
                    target = start(name, models[phase], work, plan.ctx, args.cache)
                    part = asyncio.run(measure(target, prompts, plan, rnd,
                                               lambda s, n=name: print(f"  {n}: {s}", flush=True)))
                    if phase == "prefill":
                        part = {k: v for k, v in part.items() if k not in ("peak_rss_mb", "warm_s")} | {
                            "other_cores_prefill": part["other_cores"]}
                        part["other_cores"] = max(part["other_cores"], res.get("other_cores", 0.0))
                    res.update(part)
                except Exception as exc:  # noqa: BLE001 - one broken server must not hide the others' figures
                    traceback.print_exc()
                    res = {"error": f"{phase}: {type(exc).__name__}: {exc}",
                           "log_tail": peers.tail(target.log if target else None)}
                    errors.setdefault(name, res["error"])
                    break
                finally:
                    if target is not None:
                        peers.stop(target.proc)
            res["elapsed_s"] = time.perf_counter() - t0
            if "error" not in res:
                print(f"  {name}: peak RSS {res['peak_rss_mb']:.0f} MB, other processes {res['other_cores']:.2f} "
                      f"cores, {res['elapsed_s']:.0f} s", flush=True)
            results[name].append(res)

    def each_pair(what: str, model: Path, measure: Any) -> dict[str, Any]:
        """`measure(ours, peer)` with both up, for every peer that ran; a failure is reported and the rest go on."""
        out: dict[str, Any] = {}
        for name in [n for n in runnable if n != OURS and not any("error" in r for r in results[n])]:
            print(f"{what}, ours and {name}:", flush=True)
            a = b = None
            try:
                a = start(OURS, model, work, plan.ctx, args.cache)
                b = start(name, model, work, plan.ctx, args.cache)
                out[name] = asyncio.run(measure(a, b))
            except Exception as exc:  # noqa: BLE001 - reported, and the others still run
                traceback.print_exc()
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                for t in (a, b):
                    if t is not None:
                        peers.stop(t.proc)
        return out

    def say(s: str) -> None:
        print(f"  {s}", flush=True)

    paired: dict[str, Any] = {}
    if args.pairs and OURS in runnable:
        paired = each_pair("paired follow-up", models["prefill"],
                           lambda a, b: pm.paired_followups(a, b, prompts, plan, args.pairs, say))
    paired_tps: dict[str, Any] = {}
    if args.tps_pairs and OURS in runnable:
        levels = tuple(int(x) for x in args.tps_levels.split(",") if x)
        paired_tps = each_pair("paired tok/s", models["decode"],
                               lambda a, b: pm.paired_throughput(a, b, prompts, plan, args.tps_pairs, levels, say))

    rows = {n: summarize(results[n], plan.levels) for n in runnable}
    texts_equal = {}
    for n in runnable:
        if n != OURS and OURS in results:
            pairs = [(a["tps_openai_1"]["texts"], b["tps_openai_1"]["texts"])
                     for a, b in zip(results[OURS], results[n], strict=False) if "error" not in a and "error" not in b]
            texts_equal[n] = sum(x == y for x, y in pairs), len(pairs)
    print()
    print(table(rows, runnable, plan.levels))
    for n, p in paired.items():
        if "error" in p:
            print(f"paired follow-up with {n}: FAILED {p['error']}")
        else:
            print(f"follow-up turn, paired with {n}: ours {p['ours_ms']:.0f} ms vs {p[f'{n}_ms']:.0f} ms, per-pair "
                  f"median ours ÷ {n} = {p['ratio_median']:.2f}")
    for n, p in paired_tps.items():
        if "error" in p:
            print(f"paired tok/s with {n}: FAILED {p['error']}")
            continue
        for key, v in p.items():
            print(f"tok/s, paired with {n}, {key.replace('_', ' route, ')} stream(s): ours {v['ours_tps']:.1f} vs "
                  f"{v[f'{n}_tps']:.1f}, per-pair median ours ÷ {n} = {v['ratio_median']:.2f}")
    for n, (same, total) in texts_equal.items():
        print(f"greedy 1-stream text equal to ours: {n} {same}/{total} rounds")
    for n, e in errors.items():
        print(f"FAILED {n}: {e.splitlines()[0]}")
    elapsed = time.perf_counter() - t_all
    print(f"\n(medians of {args.rounds} round(s), order rotated; {elapsed:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({
            "models": described, "plan": asdict(plan),
            "versions": vers, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "summary": rows,
            "texts_equal": texts_equal, "paired_followup": paired, "paired_tps": paired_tps, "errors": errors, "rounds": results,
            "elapsed_s": elapsed,
            "builds": {n: b.get("build") for n, b in built.items()}}, indent=2, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
