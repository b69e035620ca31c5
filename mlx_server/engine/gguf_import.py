"""Turn a llama-architecture GGUF file into an MLX model directory that mlx_lm.load accepts.

MLX reads GGUF itself (`mx.load`): F32/F16 tensors come back dense, and the legacy block quants
(Q4_0, Q4_1, Q8_0) come back as MLX affine triples (`.weight` packed uint32, `.scales`, `.biases`,
group size 32). What is left for us: llama.cpp's tensor names, its Q/K row order, a config.json
from the metadata, and a Hugging Face tokenizer rebuilt from the vocabulary in the metadata.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import mlx.core as mx

# ggml's legacy quants pack 32 values per block; mx.load keeps that as the MLX group size.
GGML_BLOCK = 32

# The weight format each mode name stands for: (keep quants?, float dtype for everything else).
_MODES: Mapping[str, tuple[bool, str]] = MappingProxyType({
    "quantized": (True, "float16"), "quantized-f32": (True, "float32"),
    "dequantized": (False, "float16"), "dequantized-bf16": (False, "bfloat16"), "dequantized-f32": (False, "float32"),
})
# Metal has fast quantized kernels; float16 scales are what mlx-community checkpoints ship.
_GPU_AUTO_MODE = "quantized"
# Measured with scripts/bench_gguf.py (docs/benchmarks.md): on MLX's CPU backend anything float16
# is 10-30x slower; dense bfloat16 decodes as fast as float32 (packed or dense) and prefills ~2x
# faster. Packed float32 is the fallback when dense bfloat16 would crowd out RAM: same decode
# speed at well under half the memory.
_CPU_AUTO_MODE = "dequantized-bf16"
_CPU_LOW_MEMORY_MODE = "quantized-f32"
# Dense bfloat16 is at most ~3.6x the file (16 bits per weight against Q4_0's 4.5).
_DENSE_BF16_GROWTH = 3.6
_MAX_RAM_SHARE = 0.5

_TOP_LEVEL_NAMES: Mapping[str, str] = MappingProxyType(
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
)
_LAYER_NAMES: Mapping[str, str] = MappingProxyType({
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
})

# llama.cpp pre-tokenizers that split every digit off before the GPT-2 regex
# (llama-vocab.cpp: "\p{N}" then the GPT-2 pattern). The HF originals spell that
# Digits(individual_digits=True) + ByteLevel(use_regex=True); transformers' GGUF converter drops it.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"})

# Bump when the output layout changes, so old imports are redone instead of reused.
_FORMAT_VERSION = 1
_MARKER = "gguf_import.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB GGUFs do not land in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_mode(mode: str, gguf_path: Path | None = None) -> str:
    """The concrete weight format for `mode`; "auto" follows the backend (and, on CPU, the RAM)."""
    if mode == "auto":
        if mx.default_device().type == mx.DeviceType.gpu:
            return _GPU_AUTO_MODE
        if gguf_path is not None:
            dense_bytes = _DENSE_BF16_GROWTH * Path(gguf_path).stat().st_size
            if dense_bytes > _MAX_RAM_SHARE * _physical_memory():
                return _CPU_LOW_MEMORY_MODE
        return _CPU_AUTO_MODE
    if mode not in _MODES:
        raise ValueError(f"unknown GGUF import mode {mode!r}; use auto or one of {sorted(_MODES)}")
    return mode


def import_gguf(gguf_path: Path, cache_dir: Path, *, mode: str = "auto") -> Path:
    """Convert a llama GGUF into an MLX model dir under cache_dir/imports, once; return the dir."""
    gguf_path = Path(gguf_path).resolve()
    resolved = resolve_mode(mode, gguf_path)
    imports = Path(cache_dir) / "imports"
    imports.mkdir(parents=True, exist_ok=True)
    target = imports / f"{_cached_digest(gguf_path, imports)[:16]}-{resolved}"
    if _is_complete(target):
        return target
    _remove_stale_tmp_dirs(imports, target.name)
    # Build beside the target (same filesystem) and rename, so a crash leaves only a .tmp dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=imports))
    try:
        _convert(gguf_path, tmp, resolved)
        if _is_complete(target):  # a concurrent import finished first; keep its copy
            return target
        if target.exists():  # a half dir not made by us (no marker): replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp_dirs(imports: Path, name: str) -> None:
    # Crashed imports leave .tmp dirs; an hour-old one is not a concurrent import still running.
    cutoff = time.time() - 3600
    for leftover in imports.glob(f".tmp-{name}-*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # another process cleaned it up first


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): do not hold back
        return 1 << 62


def _is_complete(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == _FORMAT_VERSION


def _cached_digest(path: Path, imports: Path) -> str:
    # Hashing a multi-GB file takes seconds; remember it per (path, size, mtime) on disk.
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = imports / ".hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if all(saved.get(k) == v for k, v in stamp.items()):
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = file_sha256(path)
    memo.parent.mkdir(exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**stamp, "sha256": digest}))
    os.replace(tmp, memo)
    return digest


def _convert(gguf_path: Path, out: Path, mode: str) -> None:
    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    if (arch := meta.get("general.architecture")) != "llama":
        raise ValueError(f"{gguf_path.name}: only llama-architecture GGUFs are supported, got {arch!r}")
    if "rope_freqs.weight" in tensors:
        # Llama 3.1-style scaled rope is baked into this tensor, not stated in the metadata.
        raise ValueError(f"{gguf_path.name}: GGUFs with rope_freqs (Llama 3.1 rope scaling) are not supported")
    keep_quants, dtype_name = _MODES[mode]
    config = _config_from_metadata(meta, tensors)
    weights, quant_layers = _convert_tensors(tensors, config, keep_quants, getattr(mx, dtype_name))
    del tensors
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    config["torch_dtype"] = dtype_name
    if quant_layers:
        config["quantization"] = _quantization_config(quant_layers)
    _write_weights(out, weights)
    del weights
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _save_tokenizer(meta, out, config["max_position_embeddings"])
    marker = {"format_version": _FORMAT_VERSION, "source": str(gguf_path), "mode": mode}
    (out / _MARKER).write_text(json.dumps(marker, indent=2))


def _meta_value(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _config_from_metadata(meta: Mapping[str, Any], tensors: Mapping[str, mx.array]) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return _meta_value(meta, f"llama.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab_rows = int(tensors["token_embd.weight"].shape[0])
    n_tokens = len(meta.get("tokenizer.ggml.tokens", []))
    if n_tokens > vocab_rows:
        raise ValueError(f"tokenizer has {n_tokens} tokens but the embedding only {vocab_rows} rows")
    if "output.weight" in tensors and tensors["output.weight"].shape[0] != vocab_rows:
        raise ValueError("output.weight and token_embd.weight disagree on the vocabulary size")
    config: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        # The padded embedding decides the model's shape; the tokenizer may use fewer ids.
        "vocab_size": vocab_rows,
        "attention_bias": False, "mlp_bias": False,
    }
    scaling = _rope_scaling(get("rope.scaling.type"), get("rope.scaling.factor"),
                            get("rope.scaling.original_context_length"))
    if scaling:
        config["rope_scaling"] = scaling
    for name in ("bos", "eos"):
        token_id = _meta_value(meta, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    # Chat models often end a turn with an end-of-turn token that differs from eos (Llama 3).
    eot = _meta_value(meta, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) != config.get("eos_token_id"):
        config["eos_token_id"] = [i for i in (config.get("eos_token_id"), int(eot)) if i is not None]
    return config


def _rope_scaling(kind: str | None, factor: float | None, original: int | None) -> dict[str, Any] | None:
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn":
        extra = {"original_max_position_embeddings": int(original)} if original else {}
        return {"type": "yarn", "factor": float(factor), **extra}
    raise ValueError(f"unsupported rope scaling type {kind!r} in GGUF")


def _hf_name(gguf_base: str) -> str:
    if gguf_base in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_base]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", gguf_base)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"unexpected tensor {gguf_base!r} in a llama GGUF")


def _unpermute_rows(x: mx.array, n_heads: int | None) -> mx.array:
    """Q/K rows back in HF order (n_heads is None for every other tensor: left alone)."""
    if n_heads is None:
        return x
    # convert_hf_to_gguf reorders each head's rows from [first half | second half] to interleaved
    # pairs for llama.cpp's rope: reshape(n, 2, d/2).swap(1, 2). Invert: reshape(n, d/2, 2).swap.
    head_dim = x.shape[0] // n_heads
    return x.reshape(n_heads, head_dim // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _convert_tensors(
    tensors: Mapping[str, mx.array], config: Mapping[str, Any], keep_quants: bool, dtype: mx.Dtype
) -> tuple[dict[str, mx.array], dict[str, tuple[int, int]]]:
    """HF-named weights, plus {module path: (group_size, bits)} for those left quantized."""
    weights: dict[str, mx.array] = {}
    quant_layers: dict[str, tuple[int, int]] = {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for key in sorted(k for k in tensors if k.endswith(".weight")):
        base = key[: -len(".weight")]
        name = _hf_name(base)
        n_heads = heads.get(base.rsplit(".", 1)[-1])
        if f"{base}.scales" not in tensors:
            new = {"weight": tensors[key].astype(dtype)}
        else:
            packed, scales, biases = tensors[key], tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            group_size = GGML_BLOCK
            bits = packed.shape[-1] * 32 // (scales.shape[-1] * group_size)
            if keep_quants:
                new = {"weight": packed, "scales": scales.astype(dtype), "biases": biases.astype(dtype)}
                quant_layers[name] = (group_size, bits)
            else:
                # Dequantize in float32 from the file's own float16 scales; round once, at the end.
                dense = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                      group_size=group_size, bits=bits)
                new = {"weight": dense.astype(dtype)}
        # The permutation moves whole output rows, so it applies alike to weight, scales and biases.
        new = {part: _unpermute_rows(value, n_heads) for part, value in new.items()}
        # Evaluate per tensor so peak memory stays near one copy of the model, not several.
        mx.eval(list(new.values()))
        weights.update({f"{name}.{part}": value for part, value in new.items()})
    return weights, quant_layers


def _quantization_config(quant_layers: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    # The most common format is the default; mlx_lm takes per-module entries for the rest
    # (a Q4_1 file often keeps its embedding in Q8_0).
    group_size, bits = Counter(quant_layers.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for name, (g, b) in sorted(quant_layers.items()):
        if (g, b) != (group_size, bits):
            config[name] = {"group_size": g, "bits": b, "mode": "affine"}
    return config


def _write_weights(out: Path, weights: dict[str, mx.array]) -> None:
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file_name = fmt.format(i, len(shards))
        mx.save_safetensors(str(out / file_name), shard, metadata={"format": "mlx"})
        weight_map.update({k: file_name for k in shard})
    index = {
        "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _gguf_tokenizer_converter() -> tuple[Callable[..., Any], Mapping[str, str]]:
    # transformers 5 moved the GGUF tokenizer code; both homes expose the same two names and
    # neither needs torch (the model-loading half of that integration does).
    for module_name in ("transformers.integrations.gguf.gguf_tokenizer_mapping", "transformers.integrations.ggml"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "convert_gguf_tokenizer"):
            return module.convert_gguf_tokenizer, module.GGUF_TOKENIZER_MAPPING["tokenizer"]
    raise RuntimeError("this transformers version has no GGUF tokenizer converter")


def _save_tokenizer(meta: Mapping[str, Any], out: Path, context_length: int) -> None:
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    convert, key_map = _gguf_tokenizer_converter()

    def plain(value: Any) -> Any:
        return value.tolist() if isinstance(value, mx.array) else value

    fields = {name: plain(meta[f"tokenizer.{key}"]) for key, name in key_map.items() if f"tokenizer.{key}" in meta}
    backend, _ = convert(meta["general.architecture"], fields)
    tokens: list[str] = fields["tokens"]
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )

    def token_id(kind: str) -> int | None:
        value = _meta_value(meta, f"tokenizer.ggml.{kind}_token_id")
        return int(value) if value is not None and int(value) < len(tokens) else None

    def token(kind: str) -> str | None:
        found = token_id(kind)
        return None if found is None else tokens[found]

    bos, bos_id = token("bos"), token_id("bos")
    # llama.cpp prepends BOS for sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(_meta_value(meta, "tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    # Set either way: a converter's own default may disagree with the file's flag.
    prefix = [bos] if add_bos and bos is not None else []
    backend.post_processor = processors.TemplateProcessing(
        single=[*prefix, "$A"],
        pair=[*prefix, "$A", *prefix, "$B:1"],
        special_tokens=[(bos, bos_id)] if prefix else [],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=context_length,
    )
    wrapped.save_pretrained(str(out))


def main(argv: list[str]) -> int:
    """`python -m mlx_server.engine.gguf_import FILE.gguf CACHE_DIR`: import once, print the model dir."""
    if len(argv) != 2:
        print("usage: python -m mlx_server.engine.gguf_import FILE.gguf CACHE_DIR", file=sys.stderr)
        return 2
    try:
        print(import_gguf(Path(argv[0]), Path(argv[1])))
    except Exception as exc:  # noqa: BLE001 - the parent reports the last stderr line as the reason
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
