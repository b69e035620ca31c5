"""Each GGUF architecture, logit for logit: a tiny GGUF (real tensor types, random weights) imported by mlx_server
against the same weights loaded the ordinary way (an mlx_lm model dir written from gguf-py's dequantization).

The test states llama.cpp's side itself — its tensor names (gguf-py's tensor_mapping), Q/K permutation, Gemma's +1
norms, metadata keys, the Llama 3 rope_freqs formula — so a mistake in the importer cannot cancel against the same
mistake here. Lossless repacks (quantized-f32) and dense float32 must match to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from support.gguf_builders import byte_level_vocab, gguf_dequant, logits, random_blocks, reference_dir, unpermute_rows, \
    write_gguf
from mlx_server.convert.gguf_arch import ARCHS, Meta
from mlx_server.convert.gguf import import_gguf, import_report
from mlx_server.models.gguf_file import SUPPORTED_ARCHS

LOSSLESS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K")
BASE = {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "vocab_size": 300, "rope_theta": 10000.0,
        "max_position_embeddings": 256}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# arch → (HF config for mlx_lm, extra GGUF metadata, tied embeddings, turn tokens in the vocabulary)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], bool, tuple[str, ...]]] = {
    "llama": ({**BASE, "model_type": "llama", "tie_word_embeddings": False, "rope_theta": 500000.0,
               "rope_scaling": LLAMA3_ROPE}, {}, False, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "qwen2": ({**BASE, "model_type": "qwen2", "tie_word_embeddings": True}, {}, True, ("<|im_start|>", "<|im_end|>")),
    "qwen3": ({**BASE, "model_type": "qwen3", "tie_word_embeddings": False}, {}, False, ("<|im_start|>",
                                                                                       "<|im_end|>")),
    "gemma3": ({**BASE, "model_type": "gemma3_text", "num_hidden_layers": 6, "num_key_value_heads": 1,
                "rms_norm_eps": 1e-6, "rope_theta": 1e6, "query_pre_attn_scalar": 64, "sliding_window": 4,
                "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0},
               {"attention.sliding_window": 4}, True, ("<start_of_turn>", "<end_of_turn>")),
    "gemma2": ({**BASE, "model_type": "gemma2", "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 64,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
               {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, True,
               ("<start_of_turn>", "<end_of_turn>")),
    "phi3": ({**BASE, "model_type": "phi3", "tie_word_embeddings": False, "max_position_embeddings": 256,
              "original_max_position_embeddings": 256}, {"rope.dimension_count": 64}, False,
             ("<|user|>", "<|assistant|>", "<|end|>")),
    "command-r": ({**BASE, "model_type": "cohere", "layer_norm_eps": 1e-5, "logit_scale": 0.0625},
                  {"attention.layer_norm_epsilon": 1e-5, "logit_scale": 0.0625}, True,
                  ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>")),
}
_GEMMA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(arch: str, hf: str) -> str:
    """gguf-py's tensor_mapping, HF → GGUF (the direction convert_hf_to_gguf goes)."""
    module, _, part = hf.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{part}"
    _, _, layer, rest = module.split(".", 3)
    table = {**_LAYER, **_GEMMA_LAYER} if arch.startswith("gemma") else _LAYER
    return f"blk.{layer}.{table[rest]}.{part}"


def llama3_rope_freqs(cfg: dict[str, Any]) -> np.ndarray:
    """convert_hf_to_gguf LlamaModel.generate_extra_tensors for rope_type llama3."""
    scaling, dim, base = cfg["rope_scaling"], cfg["head_dim"], cfg["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def build(arch: str, tmp: Path, types: tuple[str, ...] = LOSSLESS) -> tuple[Path, Path]:
    """(the tiny GGUF, the reference model dir holding the same weights)."""
    cfg, extra_meta, tied, turn = CASES[arch]
    rng = np.random.default_rng(sorted(CASES).index(arch))
    ref_cfg = {**cfg, "vocab_size": cfg["vocab_size"]}
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(ref_cfg)
    shapes = {k: v.shape for k, v in tree_flatten(model_class(args_class.from_dict(ref_cfg)).parameters())}
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    reference: dict[str, np.ndarray] = {}
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for i, (hf, shape) in enumerate(sorted(shapes.items())):
        if tied and hf.startswith("lm_head"):
            continue
        name = gguf_name(arch, hf)
        permuted = heads.get(name.split(".")[-2]) if arch == "llama" else None
        if len(shape) == 2 and "norm" not in hf:
            type_name = types[i % len(types)]
            data = random_blocks(type_name, shape[0], shape[1], rng)
            value = gguf_dequant(data, type_name)
            reference[hf] = unpermute_rows(value, permuted) if permuted else value
            tensors[name] = (type_name, data)
        else:
            value = rng.normal(0.0 if arch.startswith("gemma") or "bias" in hf else 1.0, 0.1, shape)
            reference[hf] = value.astype(np.float32)
            shift = 1.0 if arch.startswith("gemma") and hf.endswith("norm.weight") else 0.0  # Gemma: stored +1
            tensors[name] = ("F32", reference[hf] + np.float32(shift))
    if arch == "llama":
        tensors["rope_freqs.weight"] = ("F32", llama3_rope_freqs(cfg))
    if arch == "gemma3":  # a multimodal file's vision tower and projector: not part of the text model
        tensors["v.blk.0.attn_q.weight"] = ("F32", np.ones((32, 32), np.float32))
        tensors["mm.input_projection.weight"] = ("F32", np.ones((32, 256), np.float32))
    meta = {"context_length": cfg["max_position_embeddings"], "embedding_length": cfg["hidden_size"],
            "block_count": cfg["num_hidden_layers"], "feed_forward_length": cfg["intermediate_size"],
            "attention.head_count": cfg["num_attention_heads"],
            "attention.head_count_kv": cfg["num_key_value_heads"], "rope.freq_base": cfg["rope_theta"],
            "attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"], "attention.key_length": cfg["head_dim"],
            "attention.value_length": cfg["head_dim"], **extra_meta}
    vocab = byte_level_vocab(turn + ("<|endoftext|>",))
    vocab += [f"<extra_{i}>" for i in range(cfg["vocab_size"] - len(vocab))]
    types = [3 if t.startswith("<") and t.endswith(">") and len(t) > 1 else 1 for t in vocab]
    path = tmp / f"{arch}.gguf"
    write_gguf(path, arch, meta, tensors, vocab, types, eos=vocab.index("<|endoftext|>"))
    return path, reference_dir(tmp / f"{arch}-ref", ref_cfg, reference)


def test_every_supported_architecture_has_a_case() -> None:
    assert tuple(ARCHS) == SUPPORTED_ARCHS
    assert set(CASES) == set(SUPPORTED_ARCHS)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_logits_match_the_same_weights_loaded_the_ordinary_way(arch: str, tmp_path: Path) -> None:
    gguf, ref_dir = build(arch, tmp_path)
    reference, _ = load_model(ref_dir)
    ids = [5, 80, 17, 200, 33, 120, 64, 9, 250, 41, 77]  # longer than gemma3's 4-token sliding window
    want = logits(reference, ids)
    for mode in ("quantized-f32", "dequantized-f32"):
        model_dir = import_gguf(gguf, tmp_path / "cache", mode=mode)
        model, config = load_model(model_dir)
        got = logits(model, ids)
        scale = float(np.abs(want).max())
        assert float(np.abs(got - want).max()) < 1e-3 * scale, f"{arch} {mode}"
    # The imported config states what the reference config does (the rope scaling rebuilt from rope_freqs too).
    for key, value in CASES[arch][0].items():
        if key not in ("tie_word_embeddings", "original_max_position_embeddings"):
            assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value, key
    report = import_report(model_dir)
    assert report["chat_template"] == "builtin:" + {"qwen2": "chatml", "qwen3": "chatml", "llama": "llama3",
                                                   "gemma2": "gemma", "gemma3": "gemma"}.get(arch, arch)
    assert report["skipped_vision_tensors"] == (2 if arch == "gemma3" else 0)


def test_bfloat16_default_on_cpu_requantized_q6_k_and_quantized_layout(tmp_path: Path) -> None:
    gguf, ref_dir = build("gemma3", tmp_path, types=("Q6_K", "Q4_K", "Q5_0", "Q8_0"))
    ids = [5, 80, 17, 200, 33, 120]
    want = logits(load_model(ref_dir)[0], ids)
    scale = float(np.abs(want).max())
    exact = import_gguf(gguf, tmp_path / "cache", mode="dequantized-f32")  # dense: Q6_K exactly as gguf-py
    assert float(np.abs(logits(load_model(exact)[0], ids) - want).max()) < 1e-3 * scale
    model_dir = import_gguf(gguf, tmp_path / "cache", mode="dequantized-bf16")
    got = logits(load_model(model_dir)[0], ids)
    assert float(np.abs(got - want).max()) < 3e-2 * scale
    packed = import_gguf(gguf, tmp_path / "cache", mode="quantized-f32")  # Q6_K requantized to 8 bits
    assert float(np.abs(logits(load_model(packed)[0], ids) - want).max()) < 3e-2 * scale
    requantized = import_report(packed)["requantized"]["Q6_K"]
    assert requantized["bits"] == 8 and 0 < requantized["relative_rms_error"] < 0.006
    quant = json.loads((packed / "config.json").read_text())["quantization"]
    stored = mx.load(str(packed / "model.safetensors"))
    for module, spec in quant.items():
        if isinstance(spec, dict):
            assert stored[f"{module}.scales"].dtype == mx.float32
            weights, scales = stored[f"{module}.weight"], stored[f"{module}.scales"]
            assert weights.shape[-1] * 32 // spec["bits"] == scales.shape[-1] * 32  # columns agree


def test_gemma3_metadata_as_ollama_writes_it() -> None:
    # Ollama's own gemma3 conversions: a per-layer "is local" list instead of llama.cpp's fixed pattern of 6, no
    # rope bases in multimodal files, and (early ones) text keys under "gemma3.text.".
    fields = {"general.architecture": "gemma3", "gemma3.embedding_length": 640, "gemma3.block_count": 12,
              "gemma3.text.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
              "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
              "gemma3.attention.sliding_window_pattern": ([True] * 5 + [False]) * 2}
    meta = Meta(fields, {"token_embd.weight": (262144, 640)}, lambda name: np.zeros(1))
    cfg = ARCHS["gemma3"].config(meta)
    assert (cfg["sliding_window_pattern"], cfg["rope_theta"], cfg["rope_local_base_freq"]) == (6, 1e6, 1e4)
    assert (cfg["intermediate_size"], cfg["rms_norm_eps"], cfg["query_pre_attn_scalar"]) == (2048, 1e-6, 256)
    fields["gemma3.attention.sliding_window_pattern"] = [True, False, True, True, False, False] * 2
    with pytest.raises(ValueError, match="not periodic"):
        ARCHS["gemma3"].config(Meta(fields, {"token_embd.weight": (262144, 640)}, lambda name: np.zeros(1)))
