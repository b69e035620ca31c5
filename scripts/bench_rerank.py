#!/usr/bin/env python3
"""Rerank throughput through /v1/rerank on a real server ÷ in-process sentence-transformers `CrossEncoder` on the
same model, same CPU, same run; and the worst inter-token gap of a running stream while the pairs are scored.

The model is a random-weight BERT cross-encoder (`BertForSequenceClassification`, one label) in the shape of
cross-encoder/ms-marco-MiniLM-L6-v2 (hidden 384, 6 layers, 12 heads, MLP 1,536, 512 positions; --hidden /
--layers to change it) with the tests' WordPiece tokenizer, built here: nothing comes from the hub. One server
process (`python -m mlx_server --config … serve`) serves it (as `reranker`) and a tiny random llama (as `tiny`).
After a warm-up request to each:

  1. rerank: 1 query × --docs (100) documents of ~--doc-tokens (200) tokens in one /v1/rerank request, --rounds
     (3) times → pairs/s (median round);
  2. stall: a greedy /v1/chat/completions stream on `tiny` runs alone for a few seconds, then the same request
     is scored while it streams: the worst gap between two of its chunks, and per token, while the rerank runs
     (bench_embed.py's Stream). Goal: about one forward pass (the scheduler's slice is `server.prefill_slice`),
     never the whole rerank.

Then the server stops and the baseline scores the same pairs alone on the same CPU: sentence-transformers'
`CrossEncoder(dir, device="cpu").predict(pairs)` (its defaults: batch 32, sigmoid of the one logit, torch's
threads; median of --rounds) in a venv of its own under --work — torch is never a dependency of this project.
The venv gets the CPU torch wheel from https://download.pytorch.org/whl/cpu, else a `+cpu` torch the configured pip
indexes list (PyPI's Linux torch is the multi-GB CUDA build); when neither exists, or the install fails, the script
says so and reports ours alone.
Our scores are checked against CrossEncoder's (the largest difference over all pairs).

--blas: the `mlx-cpu` wheel on Linux links the reference BLAS (10-40x slower than the OpenBLAS / MKL torch uses;
see docs/embeddings.md); MLX calls the standard `cblas_sgemm`, so a system OpenBLAS preloaded into the server
(LD_PRELOAD) takes over. auto (default): preload one when found (Debian: `apt-get install libopenblas0-pthread`),
else the shipped build; stock: never; PATH: that library. On Apple silicon neither applies.

    .venv/bin/python scripts/bench_rerank.py                   # issue sizes
    .venv/bin/python scripts/bench_rerank.py --quick           # 20 documents of ~100 tokens, 1 round
    .venv/bin/python scripts/bench_rerank.py --no-baseline --json rerank.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
from benchserve import start_server as start
from benchserve import stop_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builders
from bench import free_port  # noqa: E402
from bench_embed import Stream, find_openblas  # noqa: E402
from bench_throughput import ADJECTIVES, PEOPLE, SUBJECTS, VERBS, CpuMeter  # noqa: E402

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DEFAULT_WORK = Path.home() / ".cache" / "mlx-server" / "bench-rerank"

ST_SCRIPT = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, sentence_transformers, torch
from sentence_transformers import CrossEncoder
job = json.load(open(sys.argv[1]))
model = CrossEncoder(job["model"], device="cpu")
pairs = [(job["query"], d) for d in job["documents"]]
model.predict(pairs[:4])
out = {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
       "torch_threads": torch.get_num_threads(), "max_length": model.max_length, "rounds": []}
for _ in range(job["rounds"]):
    start = time.perf_counter()
    scores = model.predict(pairs, convert_to_numpy=True)
    out["rounds"].append(time.perf_counter() - start)
out["scores"] = [float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1)]
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------------- model, texts


def build_cross_encoder(out: Path, hidden: int, layers: int, heads: int, seed: int = 0) -> Path:
    """A random BertForSequenceClassification checkpoint that both mlx-server and transformers load."""
    from safetensors.numpy import save_file

    from support.tinyembedders import _bert_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab, _ = _bert_tokenizer(out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["padding"] = tok["truncation"] = None  # the tests' fixed padding would pad every pair for transformers
    (out / "tokenizer.json").write_text(json.dumps(tok))
    # The generic fast tokenizer: it reads tokenizer.json (pair template included) whatever transformers' version;
    # told to return token types, or BERT would read the document as the query's segment.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "pad_token": "[PAD]",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "mask_token": "[MASK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}))
    inter, positions = 4 * hidden, 512
    cfg = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": vocab,
           "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "intermediate_size": inter, "hidden_act": "gelu", "max_position_embeddings": positions,
           "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
           "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    w = {"bert.embeddings.word_embeddings.weight": normal(vocab, hidden, std=1.0),
         "bert.embeddings.position_embeddings.weight": normal(positions, hidden, std=0.5),
         "bert.embeddings.token_type_embeddings.weight": normal(2, hidden, std=0.5),
         "bert.embeddings.LayerNorm.weight": 1.0 + normal(hidden, std=0.1),
         "bert.embeddings.LayerNorm.bias": normal(hidden, std=0.1),
         "bert.pooler.dense.weight": normal(hidden, hidden, std=1.0 / np.sqrt(hidden)),
         "bert.pooler.dense.bias": normal(hidden, std=0.1),
         "classifier.weight": normal(1, hidden, std=1.0 / np.sqrt(hidden)), "classifier.bias": normal(1, std=0.1)}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name, (rows, cols) in {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
                                   "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
                                   "intermediate.dense": (inter, hidden), "output.dense": (hidden, inter)}.items():
            w[p + name + ".weight"] = normal(rows, cols, std=1.0 / np.sqrt(cols))
            w[p + name + ".bias"] = normal(rows, std=0.05)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + norm + ".weight"] = 1.0 + normal(hidden, std=0.1)
            w[p + norm + ".bias"] = normal(hidden, std=0.1)
    save_file(w, str(out / "model.safetensors"))
    return out


def make_documents(tokenizer_json: Path, n: int, tokens: int) -> tuple[str, list[str]]:
    """A query and `n` deterministic documents of about `tokens` tokens each (never past the model's 512)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    rng = random.Random(17)

    def clause() -> str:
        return f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)}"

    documents: list[str] = []
    for _ in range(n):
        parts: list[str] = []
        while len(tok.encode(" ".join(parts)).ids) < tokens:
            parts.append(f"{clause().capitalize()} {rng.randint(2, 99)} times.")
        documents.append(" ".join(parts))
    return f"who {rng.choice(VERBS)} the {rng.choice(SUBJECTS)}?", documents


# ---------------------------------------------------------------------------------------------------- ours


def rerank(url: str, query: str, documents: list[str]) -> tuple[float, np.ndarray, int]:
    """(seconds, scores in document order, tokens scored) for one /v1/rerank request."""
    start_at = time.perf_counter()
    r = httpx.post(f"{url}/v1/rerank", json={"model": "reranker", "query": query, "documents": documents,
                                             "return_documents": False}, timeout=None)
    seconds = time.perf_counter() - start_at
    r.raise_for_status()
    body = r.json()
    scores = np.zeros(len(documents))
    for result in body["results"]:
        scores[result["index"]] = result["relevance_score"]
    return seconds, scores, int(body["usage"]["total_tokens"])


def run_server(work: Path, model: Path, tiny: Path, query: str, documents: list[str], rounds: int,
               env: dict[str, str], stream_seconds: float) -> dict[str, Any]:
    port = free_port()
    doc = {"server": {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "cache")},
           "models": {"reranker": {"source": str(model), "keep_alive": -1},
                      "tiny": {"source": str(tiny), "keep_alive": -1, "context_length": 65536}}}
    proc, url, log = start(work / "server", doc, port, env=env)
    out: dict[str, Any] = {"server_log": str(log)}
    try:
        rerank(url, query, documents[:2])
        httpx.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                 "options": {"num_predict": 4}}, timeout=None).raise_for_status()
        meter = CpuMeter(proc.pid)
        times = []
        for _ in range(rounds):
            seconds, scores, tokens = rerank(url, query, documents)
            times.append(seconds)
            print(f"  ours: {len(documents)} pairs, {tokens} tokens, {seconds:.2f} s", flush=True)
        out.update(rounds=times, seconds=float(np.median(times)), scores=scores, tokens=tokens)
        stream = Stream(url)
        stream.start()
        while len(stream.times) < 5:
            time.sleep(0.05)
        time.sleep(stream_seconds)
        alone = [b - a for a, b in zip(stream.times, stream.times[1:], strict=False)]
        began = time.monotonic()
        seconds, _, _ = rerank(url, query, documents)
        ended = time.monotonic()
        stream.stop()
        gaps = stream.gaps(began, ended) or [(float("nan"), 0.0, 1)]
        worst, at, _ = max(gaps)
        out["stall"] = {"seconds": seconds, "worst_gap": worst, "worst_gap_at": at,
                        "worst_gap_per_token": max(g / k for g, _, k in gaps),
                        "p99_gap": float(np.percentile([g for g, _, _ in gaps], 99)),
                        "tokens_during": sum(k for _, _, k in gaps),
                        "alone_worst_gap": max(alone, default=float("nan")),
                        "alone_median_gap": float(np.median(alone)) if alone else float("nan"),
                        "stream_ended_early": stream.ended_early}
        print(f"  ours with a stream: {seconds:.2f} s, worst gap {worst * 1000:.0f} ms", flush=True)
        out["other_cores"] = meter.other_cores()
    finally:
        stop_server(proc)
    return out


# ---------------------------------------------------------------------------------------------------- baseline


def _cpu_torch() -> Optional[list[str]]:
    """pip arguments for a CPU-only torch: PyTorch's CPU index, else a `+cpu` build the configured indexes list
    (a local mirror may carry one; PyPI's own Linux torch is the multi-GB CUDA build)."""
    try:
        httpx.head(f"{TORCH_CPU_INDEX}/torch/", timeout=10, follow_redirects=True).raise_for_status()
        return ["torch", "--index-url", TORCH_CPU_INDEX]
    except httpx.HTTPError:
        pass
    listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True)
    cpu = [v.strip(" ,") for v in listed.stdout.split() if v.strip(" ,").endswith("+cpu")]
    return [f"torch=={cpu[0]}"] if cpu else None


def ensure_st_venv(venv: Path) -> tuple[Optional[Path], dict[str, Any]]:
    """The venv's python (built with the CPU torch wheel if it lacks sentence-transformers), or None and why not."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import sentence_transformers, torch"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, {"built": False, "venv": str(venv)}
    torch = _cpu_torch()
    if torch is None:
        return None, {"error": f"no CPU torch: {TORCH_CPU_INDEX} cannot be reached and the configured indexes "
                               "list no +cpu torch"}
    started = time.perf_counter()
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", *torch],
             [str(python), "-m", "pip", "install", "-q", "sentence-transformers"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return None, {"error": f"building the baseline venv failed at `{' '.join(step[-4:])}`: "
                                   f"{(done.stderr or done.stdout).strip()[-500:]}"}
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True).stdout.split()[0])
    return python, {"built": True, "venv": str(venv), "install_s": time.perf_counter() - started,
                    "size_bytes": size}


def run_st(python: Path, model: Path, work: Path, query: str, documents: list[str], rounds: int) -> dict[str, Any]:
    job = work / "st_job.json"
    job.write_text(json.dumps({"model": str(model), "query": query, "documents": documents, "rounds": rounds}))
    done = subprocess.run([str(python), "-c", ST_SCRIPT, str(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sentence-transformers run failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["seconds"] = float(np.median(out["rounds"]))
    return out


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 documents of ~100 tokens, 1 round")
    ap.add_argument("--docs", type=int, help="documents per request (default 100; --quick 20)")
    ap.add_argument("--doc-tokens", type=int, help="tokens per document (default 200; --quick 100)")
    ap.add_argument("--rounds", type=int, help="timed requests, median counts (default 3; --quick 1)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--stream-seconds", type=float, default=3.0, help="the stream alone before the rerank")
    ap.add_argument("--blas", default="auto", help="auto | stock | PATH of a BLAS library to preload (see above)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="models, server files and the baseline venv")
    ap.add_argument("--no-baseline", action="store_true", help="skip sentence-transformers")
    ap.add_argument("--json", type=Path, default=Path("bench_rerank.json"))
    args = ap.parse_args()
    n_docs = args.docs or (20 if args.quick else 100)
    doc_tokens = args.doc_tokens or (100 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 3)
    blas = find_openblas() if args.blas == "auto" else None if args.blas == "stock" else Path(args.blas)
    env = {"LD_PRELOAD": str(blas)} if blas is not None else {}
    from support.tinymodels import build_tiny_model

    started = time.perf_counter()
    work = args.work
    model = build_cross_encoder(work / f"cross-encoder-{args.hidden}x{args.layers}", args.hidden, args.layers,
                                args.heads)
    tiny = build_tiny_model(work / "tiny", hidden_size=128, num_layers=3, max_position_embeddings=65536)
    query, documents = make_documents(model / "tokenizer.json", n_docs, doc_tokens)
    print(f"server ({'OpenBLAS ' + blas.name if blas else 'stock BLAS'}): 1 query x {n_docs} documents of "
          f"~{doc_tokens} tokens", flush=True)
    ours = run_server(work, model, tiny, query, documents, rounds, env, args.stream_seconds)
    theirs: Optional[dict[str, Any]] = None
    venv_info: dict[str, Any] = {}
    if not args.no_baseline:
        python, venv_info = ensure_st_venv(work / "st-venv")
        if python is None:
            print(f"baseline unavailable, reporting ours alone: {venv_info['error']}", file=sys.stderr)
        else:
            print(f"sentence-transformers CrossEncoder, in process: {n_docs} pairs", flush=True)
            try:
                theirs = run_st(python, model, work, query, documents, rounds)
            except RuntimeError as exc:
                venv_info["error"] = str(exc)
                print(f"baseline failed, reporting ours alone: {exc}", file=sys.stderr)
    report(args, ours, theirs, venv_info, n_docs, blas, started)


def report(args: argparse.Namespace, ours: dict[str, Any], theirs: Optional[dict[str, Any]],
           venv_info: dict[str, Any], n_docs: int, blas: Optional[Path], started: float) -> None:
    nan = float("nan")
    row: dict[str, Any] = {"pairs": n_docs, "tokens": ours["tokens"], "ours_s": ours["seconds"],
                           "ours_pairs_per_s": n_docs / ours["seconds"],
                           "server_blas": f"OpenBLAS ({blas})" if blas else "stock"}
    if theirs is not None:
        row["theirs_s"] = theirs["seconds"]
        row["theirs_pairs_per_s"] = n_docs / theirs["seconds"]
        row["ratio"] = row["ours_pairs_per_s"] / row["theirs_pairs_per_s"]
        row["max_score_diff"] = float(np.abs(np.asarray(theirs["scores"]) - ours["scores"]).max())
    st = ours["stall"]
    print("\n| pairs | tokens scored | server BLAS | ours pairs/s | CrossEncoder pairs/s | ours ÷ theirs | "
          "max score diff | stream alone: median / worst gap | worst gap while reranking | worst gap per token |"
          "\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    early = " (stream ended early!)" if st["stream_ended_early"] else ""
    print(f"| {n_docs} | {row['tokens']} | {row['server_blas']} | {row['ours_pairs_per_s']:.1f} | "
          f"{row.get('theirs_pairs_per_s', nan):.1f} | {row.get('ratio', nan):.2f} | "
          f"{row.get('max_score_diff', nan):.2e} | {st['alone_median_gap'] * 1000:.0f} / "
          f"{st['alone_worst_gap'] * 1000:.0f} ms | {st['worst_gap'] * 1000:.0f} ms{early} | "
          f"{st['worst_gap_per_token'] * 1000:.0f} ms |")
    if theirs is not None:
        print(f"baseline: torch {theirs['torch']} ({theirs['torch_threads']} threads), sentence-transformers "
              f"{theirs['sentence_transformers']}, max_length {theirs['max_length']}; rounds "
              + ", ".join(f"{t:.2f}" for t in theirs["rounds"]) + " s")
    elif not args.no_baseline:
        print(f"baseline: none ({venv_info.get('error')})")
    if venv_info.get("built"):
        print(f"baseline venv built: {venv_info['install_s']:.0f} s, {venv_info['size_bytes'] / 2**30:.2f} GiB")
    if ours["other_cores"] > 0.25:
        print(f"WARNING: other processes kept {ours['other_cores']:.2f} cores busy while ours ran: rerun on a quiet "
              f"machine before quoting these figures")
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "row": row,
              "ours": {k: v for k, v in ours.items() if k != "scores"},
              "baseline": None if theirs is None else {k: v for k, v in theirs.items() if k != "scores"},
              "st_venv": venv_info, "platform": platform.platform(), "cpus": os.cpu_count(),
              "wall_s": time.perf_counter() - started}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wall {result['wall_s']:.0f} s; JSON: {args.json}")


if __name__ == "__main__":
    main()
