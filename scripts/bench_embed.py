#!/usr/bin/env python3
"""Embedding throughput through /api/embed on a real server ÷ in-process sentence-transformers, same CPU, same run;
and the worst inter-token gap of a running stream while 1,000 texts are embedded.

One server process (`python -m mlx_server --config … serve`) serves the embedded all-MiniLM-L6-v2
(`package:all_minilm_l6_v2/model.zip`, as `all-minilm`) and a tiny random llama (tests/support/tinymodels.py, as `tiny`).
After a warm-up request to each model:

  1. short: 1,000 short texts (~9 tokens each) in one /api/embed request → embeddings/s;
  2. long: 100 texts of ~500 tokens in one request → embeddings/s. all-MiniLM truncates at its 256-token
     max_seq_length (sentence_bert_config.json), as sentence-transformers does, so each is embedded as 256 tokens;
  3. stall: a greedy /v1/chat/completions stream on `tiny` runs alone for a few seconds (its gaps alone), then the
     1,000 short texts are embedded again while it streams: the worst gap between two of its chunks, and per token
     (see Stream), while the embed runs. Goal: about one embed forward pass (the scheduler's slice is
     `server.prefill_slice`, 50 ms, but a pass is never smaller than one input), not the embed's whole length.

Then the server stops and the baseline runs on the same texts, alone on the same CPU: sentence-transformers
(`SentenceTransformer(dir, device="cpu").encode(texts)`, its defaults: batch 32, torch's threads; median of 3
rounds) in a venv of its own — torch is never a dependency of this project. On Linux x86_64 PyPI's torch is the
CUDA build (multi-GB with its nvidia-* wheels), so the venv is built with a `+cpu` torch wheel when pip can see one
(`pip index versions torch`), and refused otherwise (pass --st-venv with a ready venv). The venv is kept
(--st-venv, default ~/.cache/mlx-server/bench-st-venv) and what building it cost is measured and reported. The
server's vectors are checked against sentence-transformers' (cosine, every text): the real model, not a reference
re-implementation.

Two server variants (--blas): the `mlx-cpu` wheel as it ships on Linux links the reference (netlib) BLAS — about
1-4 GFLOP/s here, 10-40x slower than the OpenBLAS / MKL torch uses — and MLX calls the standard `cblas_sgemm`, so a
system OpenBLAS preloaded into the server (LD_PRELOAD) takes over its matrix products without any code change.
--blas auto (default) runs the shipped build on --stock-fraction (0.1) of the texts (at full size it alone takes
~10 min here) and, when a system OpenBLAS is found (Debian: `apt-get install libopenblas0-pthread`), a second server
with it preloaded on all of them; --blas stock / PATH runs one variant on all texts. On Apple silicon MLX uses
Accelerate / Metal and neither applies.

    .venv/bin/python scripts/bench_embed.py                    # issue sizes, ~2.5-4 min on 2 cores
    .venv/bin/python scripts/bench_embed.py --quick            # 100 short + 10 long texts, ~45 s
    .venv/bin/python scripts/bench_embed.py --blas stock --json embed.json --st-venv /tmp/st
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import psutil
from benchserve import start_server as start
from benchserve import stop_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builder
from bench import free_port  # noqa: E402
from bench_throughput import ADJECTIVES, PEOPLE, SUBJECTS, VERBS, CpuMeter  # noqa: E402

MINILM = "package:all_minilm_l6_v2/model.zip"
DEFAULT_VENV = Path.home() / ".cache" / "mlx-server" / "bench-st-venv"

ST_SCRIPT = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, sentence_transformers, torch
from sentence_transformers import SentenceTransformer
job = json.load(open(sys.argv[1]))
model = SentenceTransformer(job["model"], device="cpu")
model.encode(["warm up"] * 8)
out = {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
       "torch_threads": torch.get_num_threads(), "max_seq_length": model.max_seq_length}
for name in ("short", "long"):
    out[name] = []
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        vectors = model.encode(job[name], normalize_embeddings=True, convert_to_numpy=True)
        out[name].append(time.perf_counter() - start)
    np.save(job["out"] + "_" + name + ".npy", vectors.astype(np.float32))
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------------- texts


def make_texts(tokenizer_json: Path, n_short: int, n_long: int, long_tokens: int) -> tuple[list[str], list[str]]:
    """Deterministic texts: short ones a clause each; long ones sentences up to ~long_tokens tokens (untruncated)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    rng = random.Random(13)

    def clause() -> str:
        return f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)}"

    short = [f"{clause()} {i}" for i in range(n_short)]
    long: list[str] = []
    for _ in range(n_long):
        parts: list[str] = []
        while len(tok.encode(" ".join(parts)).ids) < long_tokens:
            parts.append(f"{clause().capitalize()} {rng.randint(2, 99)} times.")
        long.append(" ".join(parts))
    return short, long


# ---------------------------------------------------------------------------------------------------- server


OPENBLAS = ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
            "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0", "/usr/lib64/libopenblas.so.0")


def find_openblas() -> Optional[Path]:
    if platform.system() != "Linux":
        return None
    return next((Path(p) for p in OPENBLAS if Path(p).exists()), None)


def start_server(work: Path, tiny: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    doc = {
        "server": {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "cache")},
        "models": {"all-minilm": {"source": MINILM, "keep_alive": -1},
                   "tiny": {"source": str(tiny), "keep_alive": -1, "context_length": 65536}},
    }
    return start(work, doc, port, env=env)


def embed(url: str, texts: list[str]) -> tuple[float, np.ndarray, int]:
    """(seconds, vectors, prompt tokens) for one /api/embed request."""
    start = time.perf_counter()
    r = httpx.post(f"{url}/api/embed", json={"model": "all-minilm", "input": texts}, timeout=None)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    body = r.json()
    return seconds, np.array(body["embeddings"], dtype=np.float32), int(body["prompt_eval_count"])


def _read_stream(url: str, out: Any, stop: Any) -> None:
    """The stream reader's process: (monotonic time, tokens) per chunk into `out`; None when the server ended it."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "one two three"}], "stream": True,
            "temperature": 0, "max_tokens": 60000, "logprobs": True}
    with httpx.Client(timeout=None) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if stop.is_set():
                return  # closing the response cancels the request on the server
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.put(None)
                return
            choices = json.loads(line[6:]).get("choices") or [{}]
            n = len(((choices[0].get("logprobs") or {}).get("content")) or [])
            if n:
                out.put((time.monotonic(), n))


class Stream:
    """A greedy /v1/chat/completions stream on `tiny` with logprobs (one entry per token, so each chunk says how
    many tokens it carries), recording when each chunk arrives, until stopped.

    It is read in a process of its own: in a thread here, this process's own work — decoding the embed answer's
    1,000 × 384 floats takes a GIL-holding ~0.1 s — would delay the timestamps and show as gaps the server never
    made. CLOCK_MONOTONIC is one clock for both processes.

    A random model's tokens are often bytes that do not yet form text: the server holds them (partial UTF-8) and
    sends them with the next chunk, so one chunk can carry several tokens. Alone, at ~2 ms a token, that is
    invisible; while an embed takes ~50 ms slices it makes a chunk gap several slices long. Both are reported: the
    gap between chunks (what a client sees) and the gap per token (a chunk's gap ÷ the tokens in it)."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_read_stream, args=(url, self._queue, self._stop), daemon=True)
        self._times: list[float] = []
        self.tokens: list[int] = []
        self.ended_early = False

    def start(self) -> None:
        self._proc.start()

    @property
    def times(self) -> list[float]:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return self._times
            if item is None:
                self.ended_early = True
            else:
                self._times.append(item[0])
                self.tokens.append(item[1])

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
        self.times  # noqa: B018 - collect what arrived before the stop

    def gaps(self, start: float, end: float) -> list[tuple[float, float, int]]:
        """(gap, when it began relative to `start`, tokens the later chunk carries) for every interval between
        consecutive chunks that overlaps [start, end]."""
        t = self.times
        return [(b - a, a - start, k) for a, b, k in zip(t, t[1:], self.tokens[1:]) if b >= start and a <= end]


def run_server(work: Path, tiny: Path, short: list[str], long: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc, url, log = start_server(work, tiny, env)
    out: dict[str, Any] = {"server_log": str(log)}
    try:
        t0 = time.perf_counter()
        embed(url, ["warm up"])
        httpx.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                 "options": {"num_predict": 4}}, timeout=None).raise_for_status()
        out["warmup_s"] = time.perf_counter() - t0
        meter = CpuMeter(proc.pid)
        for name, texts in (("short", short), ("long", long)):
            seconds, vectors, tokens = embed(url, texts)
            out[name] = {"seconds": seconds, "tokens": tokens, "vectors": vectors}
            print(f"  ours {name}: {len(texts)} texts, {tokens} tokens, {seconds:.1f} s", flush=True)
        stream = Stream(url)
        stream.start()
        while len(stream.times) < 5:
            time.sleep(0.05)
        time.sleep(3.0)
        alone = [b - a for a, b in zip(stream.times, stream.times[1:])]
        start = time.monotonic()
        seconds, _, tokens = embed(url, short)
        end = time.monotonic()
        stream.stop()
        gaps = stream.gaps(start, end) or [(float("nan"), 0.0, 1)]
        worst, at, _ = max(gaps)
        out["stall"] = {"seconds": seconds, "texts": len(short), "worst_gap": worst, "worst_gap_at": at,
                        "p99_gap": float(np.percentile([g for g, _, _ in gaps], 99)),
                        "gaps_over_100ms": sum(g > 0.1 for g, _, _ in gaps),
                        "worst_gap_per_token": max(g / k for g, _, k in gaps),
                        "tokens_during": sum(k for _, _, k in gaps),
                        "alone_worst_gap": max(alone), "alone_median_gap": float(np.median(alone)),
                        "chunks_during": sum(start <= t <= end for t in stream.times),
                        "stream_ended_early": stream.ended_early}
        print(f"  ours with a stream: {seconds:.1f} s, worst gap {out['stall']['worst_gap'] * 1000:.0f} ms",
              flush=True)
        out["other_cores"] = meter.other_cores()
    finally:
        stop_server(proc)
    return out


# ---------------------------------------------------------------------------------------------------- baseline


def torch_requirement() -> Optional[str]:
    """What to pip install for a CPU torch, or None when only PyPI's CUDA build is to be had (Linux x86_64)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "torch"  # macOS and aarch64 wheels on PyPI are CPU builds
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True,
                             text=True).stdout
    cpu = [v.strip(" ,") for line in listing.splitlines() if "Available versions:" in line
           for v in line.split(":", 1)[1].split(",") if v.strip().endswith("+cpu")]
    return f"torch=={cpu[0]}" if cpu else None


def ensure_st_venv(venv: Path) -> tuple[Path, dict[str, Any]]:
    """The venv's python, building the venv if it has no sentence-transformers; what building cost, if it was."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import sentence_transformers, torch"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, {"built": False, "venv": str(venv)}
    requirement = torch_requirement()
    if requirement is None:
        raise RuntimeError("no CPU build of torch is visible to pip, and PyPI's Linux torch is the multi-GB CUDA "
                           "build: make a venv with torch (CPU) and sentence-transformers, pass it as --st-venv")
    shutil.rmtree(venv, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", requirement, "sentence-transformers"], check=True)
    seconds = time.perf_counter() - start
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True).stdout.split()[0])
    return python, {"built": True, "venv": str(venv), "install_s": seconds, "size_bytes": size,
                    "torch_requirement": requirement}


def run_st(python: Path, model_dir: Path, work: Path, short: list[str], long: list[str],
           rounds: int = 3) -> dict[str, Any]:
    """sentence-transformers on the texts, `rounds` times each (it takes seconds): the median time counts, so one
    round slowed by the shared box's other jobs does not decide the ratio."""
    job = work / "st_job.json"
    job.write_text(json.dumps({"model": str(model_dir), "short": short, "long": long, "out": str(work / "st"),
                               "rounds": rounds}))
    # CPU used by others meanwhile: all busy time less this process's, whose children's (the baseline's) counts
    # once it has been waited for.
    me, wall = psutil.Process(), time.perf_counter()
    busy0, mine0 = sum(psutil.cpu_times()[:3]), sum(me.cpu_times()[:4])
    done = subprocess.run([str(python), "-c", ST_SCRIPT, str(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sentence-transformers run failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    others = (sum(psutil.cpu_times()[:3]) - busy0) - (sum(me.cpu_times()[:4]) - mine0)
    out["other_cores"] = max(0.0, others) / (time.perf_counter() - wall)
    for name in ("short", "long"):
        out[name] = {"seconds": float(np.median(out[name])), "rounds": out[name],
                     "vectors": np.load(work / f"st_{name}.npy")}
    return out


# ---------------------------------------------------------------------------------------------------- report


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 short + 10 long texts")
    ap.add_argument("--short", type=int, help="short texts (default 1000; --quick 100)")
    ap.add_argument("--long", type=int, help="long texts (default 100; --quick 10)")
    ap.add_argument("--long-tokens", type=int, default=500, help="tokens per long text before truncation")
    ap.add_argument("--blas", default="auto", help="auto | stock | PATH of a BLAS library to preload (see above)")
    ap.add_argument("--stock-fraction", type=float, default=0.1, help="share of the texts the shipped build embeds "
                    "when --blas auto also runs an OpenBLAS server")
    ap.add_argument("--st-venv", type=Path, default=DEFAULT_VENV, help="venv with sentence-transformers (built "
                    "here if it lacks it)")
    ap.add_argument("--no-baseline", action="store_true", help="skip sentence-transformers")
    ap.add_argument("--json", type=Path, default=Path("bench_embed.json"))
    args = ap.parse_args()
    n_short = args.short or (100 if args.quick else 1000)
    n_long = args.long or (10 if args.quick else 100)
    blas = find_openblas() if args.blas == "auto" else None if args.blas == "stock" else Path(args.blas)
    # (label, server environment, share of the texts)
    variants: list[tuple[str, dict[str, str], float]] = []
    if args.blas in ("auto", "stock"):
        variants.append(("stock", {}, args.stock_fraction if blas is not None else 1.0))
    if blas is not None:
        variants.append((f"OpenBLAS ({blas.name})", {"LD_PRELOAD": str(blas)}, 1.0))

    from mlx_server.models.sources import extract_zip, resolve_package_file
    from support.tinymodels import build_tiny_model

    started = time.perf_counter()
    ours: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        work = Path(tmp)
        model_dir = extract_zip(resolve_package_file(MINILM), work / "minilm")
        tiny = build_tiny_model(work / "tiny", hidden_size=128, num_layers=3, max_position_embeddings=65536)
        short, long = make_texts(model_dir / "tokenizer.json", n_short, n_long, args.long_tokens)
        for i, (label, env, share) in enumerate(variants):
            k_short, k_long = max(1, round(n_short * share)), max(1, round(n_long * share))
            print(f"server, {label} BLAS: {k_short} short + {k_long} long texts", flush=True)
            ours[label] = run_server(work / f"server{i}", tiny, short[:k_short], long[:k_long], env)
        theirs: Optional[dict[str, Any]] = None
        venv_info: dict[str, Any] = {}
        baseline_error = None
        if not args.no_baseline:
            try:
                python, venv_info = ensure_st_venv(args.st_venv)
                print(f"sentence-transformers, in process: {n_short} short + {n_long} long texts", flush=True)
                theirs = run_st(python, model_dir, work, short, long)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                baseline_error = str(exc)
                print(f"baseline unavailable: {exc}", file=sys.stderr)
    report_all(args, ours, theirs, venv_info, baseline_error, started)


def report_all(args: argparse.Namespace, ours: dict[str, dict[str, Any]], theirs: Optional[dict[str, Any]],
               venv_info: dict[str, Any], baseline_error: Optional[str], started: float) -> None:
    rows: list[dict[str, Any]] = []
    for label, run in ours.items():
        for name in ("short", "long"):
            n = len(run[name]["vectors"])
            row: dict[str, Any] = {"workload": name, "server_blas": label, "texts": n, "tokens": run[name]["tokens"],
                                   "seconds": run[name]["seconds"], "ours_per_s": n / run[name]["seconds"]}
            if theirs is not None:
                total = len(theirs[name]["vectors"])
                row["theirs_per_s"] = total / theirs[name]["seconds"]
                row["ratio"] = row["ours_per_s"] / row["theirs_per_s"]
                row["min_cosine"] = min_cosine(run[name]["vectors"], theirs[name]["vectors"][:n])
            rows.append(row)
    nan = float("nan")
    print("\n| workload | server BLAS | texts | tokens embedded | ours emb/s | sentence-transformers emb/s "
          "| ours ÷ theirs | min cosine ours vs theirs |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['server_blas']} | {r['texts']} | {r['tokens']} | {r['ours_per_s']:.1f} | "
              f"{r.get('theirs_per_s', nan):.1f} | {r.get('ratio', nan):.2f} | {r.get('min_cosine', nan):.6f} |")
    print("\n| server BLAS | stream alone: median / worst chunk gap | embedding N short texts alongside | "
          "worst chunk gap meanwhile (at) | p99 chunk gap | chunk gaps > 100 ms | worst gap per token | "
          "other cores busy |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, run in ours.items():
        st = run["stall"]
        early = " (stream ended early!)" if st["stream_ended_early"] else ""
        print(f"| {label} | {st['alone_median_gap'] * 1000:.0f} / {st['alone_worst_gap'] * 1000:.0f} ms | "
              f"{st['texts']} in {st['seconds']:.1f} s ({st['chunks_during']} chunks, {st['tokens_during']} "
              f"tokens) | {st['worst_gap'] * 1000:.0f} ms{early} ({st['worst_gap_at']:+.1f} s) | "
              f"{st['p99_gap'] * 1000:.0f} ms | {st['gaps_over_100ms']} | **{st['worst_gap_per_token'] * 1000:.0f} "
              f"ms** | {run['other_cores']:.2f} |")
    if venv_info.get("built"):
        print(f"\nsentence-transformers venv built: {venv_info['install_s']:.0f} s, "
              f"{venv_info['size_bytes'] / 2**30:.2f} GiB ({venv_info['torch_requirement']})")
    if theirs is not None:
        rounds = "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in theirs[k]["rounds"]) + " s"
                           for k in ("short", "long"))
        print(f"baseline: torch {theirs['torch']} ({theirs['torch_threads']} threads), sentence-transformers "
              f"{theirs['sentence_transformers']}, max_seq_length {theirs['max_seq_length']}; median of rounds "
              f"({rounds}); other cores busy meanwhile {theirs['other_cores']:.2f}")
    busy = [run["other_cores"] for run in ours.values()] + ([theirs["other_cores"]] if theirs else [])
    if max(busy, default=0.0) > 0.25:
        print(f"WARNING: other processes kept up to {max(busy):.2f} cores busy: with 2 cores, threaded BLAS and torch "
              f"slow down several-fold under such load; rerun on a quiet machine before quoting these figures")
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows,
              "servers": {label: {k: v for k, v in run.items() if k not in ("short", "long")}
                          for label, run in ours.items()},
              "baseline": None if theirs is None else {k: v for k, v in theirs.items() if k not in ("short", "long")},
              "baseline_seconds": None if theirs is None else {k: theirs[k]["rounds"] for k in ("short", "long")},
              "baseline_error": baseline_error, "st_venv": venv_info, "platform": platform.platform(),
              "cpus": os.cpu_count(), "wall_s": time.perf_counter() - started}
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wall {report['wall_s']:.0f} s; JSON: {args.json}")


if __name__ == "__main__":
    main()
