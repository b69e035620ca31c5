"""Per-architecture knowledge for GGUF import: config.json from the metadata, llama.cpp tensor names → the names
mlx_lm's model classes load, and the converter quirks to undo (numpy only; no MLX here).

What llama.cpp's convert_hf_to_gguf.py changes on the way in, and so what is undone here:
- llama (also Mistral and the R1 Llama distills): Q and K rows are permuted per head for llama.cpp's rope
  (`permute`), and Llama 3.1+ rope scaling is written as a `rope_freqs` tensor instead of metadata.
- gemma2 / gemma3: every RMSNorm weight is stored +1 (HF's Gemma computes x * (1 + w), llama.cpp x * w);
  HF's `pre_feedforward_layernorm` is llama.cpp's `ffn_norm`. Sliding-window pattern and local rope base are
  llama.cpp constants for gemma3 (every 6th layer global, base 10000), not metadata.
- phi3: llama.cpp keeps Phi-3's fused `qkv_proj` and `gate_up_proj` (as `attn_qkv` / `ffn_up`), which mlx_lm's
  phi3 also loads fused; longrope factors are tensors.
- qwen2 / qwen3 / command-r: renamed only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import numpy as np

from mlx_server.models.gguf_file import SUPPORTED_ARCHS

_TOP: Mapping[str, str] = MappingProxyType(
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
)
_PROJ = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA = {**_PROJ, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA = {
    **_PROJ,
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3 = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
_COHERE = {**_PROJ, **_QK_NORM, "attn_norm": "input_layernorm"}
# Tensors that only feed the config (rope factors); never written as weights.
_CONFIG_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})


class Meta:
    """The metadata and tensor table of one GGUF, read through the architecture's key prefix."""

    def __init__(
        self,
        fields: Mapping[str, Any],
        shapes: Mapping[str, tuple[int, ...]],
        small_tensor: Callable[[str], np.ndarray],
    ) -> None:
        self.fields = fields
        self.shapes = shapes
        self.arch = str(fields.get("general.architecture", ""))
        self.small_tensor = small_tensor  # float32 contents of a (small, config-only) tensor

    def get(self, key: str, default: Any = None) -> Any:
        # Ollama's early gemma3 conversions put text-model keys under "<arch>.text.".
        return self.fields.get(f"{self.arch}.{key}", self.fields.get(f"{self.arch}.text.{key}", default))

    def int(self, key: str, default: Optional[int] = None) -> int:
        value = self.get(key, default)
        if isinstance(value, list):  # per-layer values (OpenELM-style files)
            if len(set(value)) != 1:
                raise ValueError(f"per-layer {key} values are not supported")
            value = value[0]
        if value is None:
            raise ValueError(f"the GGUF has no {self.arch}.{key}")
        return int(value)

    def float(self, key: str, default: float) -> float:
        return float(self.get(key, default))


@dataclass(frozen=True)
class Arch:
    model_type: str
    layer_names: Mapping[str, str]
    config: Callable[[Meta], dict[str, Any]]
    permute_qk: bool = False  # llama: undo convert_hf_to_gguf's per-head Q/K row permutation
    norm_shift: float = 0.0  # gemma: norms are stored +1
    notes: tuple[str, ...] = field(default=())


def _base(m: Meta, model_type: str) -> dict[str, Any]:
    heads = m.int("attention.head_count")
    hidden = m.int("embedding_length")
    vocab_rows = m.shapes["token_embd.weight"][0]
    if "output.weight" in m.shapes and m.shapes["output.weight"][0] != vocab_rows:
        raise ValueError("output.weight and token_embd.weight disagree on the vocabulary size")
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": m.int("block_count"),
        "intermediate_size": m.int("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": m.int("attention.head_count_kv", heads),
        "head_dim": m.int("attention.key_length", hidden // heads),
        "rms_norm_eps": m.float("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": m.float("rope.freq_base", 10000.0),
        "max_position_embeddings": m.int("context_length", 4096),
        # The padded embedding decides the model's shape; the tokenizer may use fewer ids.
        "vocab_size": vocab_rows,
        "tie_word_embeddings": "output.weight" not in m.shapes,
    }


def _metadata_rope_scaling(m: Meta) -> Optional[dict[str, Any]]:
    kind, factor = m.get("rope.scaling.type"), m.get("rope.scaling.factor")
    original = m.get("rope.scaling.original_context_length")
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn":
        extra = {"original_max_position_embeddings": int(original)} if original else {}
        return {"type": "yarn", "factor": float(factor), **extra}
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def _llama3_factors(dims: int, base: float, scaling: Mapping[str, Any]) -> np.ndarray:
    # convert_hf_to_gguf's LlamaModel.generate_extra_tensors: the rope_freqs it writes for rope_type llama3.
    freqs = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float32) / dims))
    factor, low, high, old = (
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, middle))


def _rope_from_freqs(m: Meta, cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_scaling for a `rope_freqs` tensor: llama3's parameters when they reproduce it, else the factors as is."""
    factors = m.small_tensor("rope_freqs.weight").astype(np.float64)
    factor = float(factors.max())
    for old in (8192, 4096, 16384, 32768, 2048):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 8.0)):
            scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old,
            }
            if np.allclose(_llama3_factors(cfg["head_dim"], cfg["rope_theta"], scaling), factors, rtol=1e-5):
                return scaling
    # Not llama3's formula: mlx_lm's longrope takes per-frequency factors; equal context lengths keep its scale 1.
    found = [float(x) for x in factors]
    return {
        "rope_type": "longrope",
        "long_factor": found,
        "short_factor": found,
        "original_max_position_embeddings": cfg["max_position_embeddings"],
    }


def _llama(m: Meta) -> dict[str, Any]:
    cfg = _base(m, "llama")
    cfg["attention_bias"] = "blk.0.attn_q.bias" in m.shapes
    cfg["mlp_bias"] = "blk.0.ffn_up.bias" in m.shapes
    scaling = _rope_from_freqs(m, cfg) if "rope_freqs.weight" in m.shapes else _metadata_rope_scaling(m)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _qwen(model_type: str) -> Callable[[Meta], dict[str, Any]]:
    def build(m: Meta) -> dict[str, Any]:
        cfg = _base(m, model_type)
        scaling = _metadata_rope_scaling(m)
        if scaling:
            cfg["rope_scaling"] = scaling
        return cfg

    return build


def _window_pattern(value: Any, layers: int) -> int:
    """mlx_lm's period (every n-th layer global) from llama.cpp's default (6) or Ollama's per-layer "is local" list."""
    if not isinstance(value, list):
        return int(value or 6)
    period = next((i + 1 for i, local in enumerate(value) if not local), layers + 1)
    if [bool(local) for local in value] != [(i + 1) % period != 0 for i in range(len(value))]:
        raise ValueError("a sliding-window layer pattern that is not periodic is not supported")
    return period


def _gemma3(m: Meta) -> dict[str, Any]:
    cfg = _base(m, "gemma3_text")
    # llama.cpp's llama-model.cpp: the 27B (62 layers) scales queries by hidden/heads, the others by head_dim.
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 62 else cfg["head_dim"]
    # Global layers' and local (sliding) layers' rope bases: llama.cpp writes the first and fixes the second at
    # 10000; Ollama's multimodal conversions write neither (the same defaults).
    cfg.update(
        rms_norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
        query_pre_attn_scalar=scalar,
        rope_theta=m.float("rope.freq_base", 1e6),
        rope_local_base_freq=m.float("rope.local.freq_base", 1e4),
        sliding_window=m.int("attention.sliding_window", 512),
        sliding_window_pattern=_window_pattern(m.get("attention.sliding_window_pattern"), cfg["num_hidden_layers"]),
    )
    scaling = _metadata_rope_scaling(m)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _gemma2(m: Meta) -> dict[str, Any]:
    cfg = _base(m, "gemma2")
    # As for gemma3: the 27B (46 layers) scales queries by hidden/heads.
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 46 else cfg["head_dim"]
    cfg.update(
        rms_norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
        query_pre_attn_scalar=scalar,
        attn_logit_softcapping=m.float("attn_logit_softcapping", 50.0),
        final_logit_softcapping=m.float("final_logit_softcapping", 30.0),
    )
    return cfg


def _phi3(m: Meta) -> dict[str, Any]:
    cfg = _base(m, "phi3")
    rotated = m.int("rope.dimension_count", cfg["head_dim"])
    cfg["partial_rotary_factor"] = rotated / cfg["head_dim"]
    cfg["original_max_position_embeddings"] = m.int(
        "rope.scaling.original_context_length", cfg["max_position_embeddings"]
    )
    if "rope_factors_long.weight" in m.shapes:
        long = [float(x) for x in m.small_tensor("rope_factors_long.weight")]
        short = (
            [float(x) for x in m.small_tensor("rope_factors_short.weight")]
            if "rope_factors_short.weight" in m.shapes
            else long
        )
        cfg["rope_scaling"] = {"type": "longrope", "long_factor": long, "short_factor": short}
    return cfg


def _command_r(m: Meta) -> dict[str, Any]:
    cfg = _base(m, "cohere")
    cfg.update(
        layer_norm_eps=m.float("attention.layer_norm_epsilon", 1e-5),
        logit_scale=m.float("logit_scale", 0.0625),
        use_qk_norm="blk.0.attn_q_norm.weight" in m.shapes,
        attention_bias="blk.0.attn_q.bias" in m.shapes,
        layer_norm_bias="output_norm.bias" in m.shapes,
    )
    return cfg


ARCHS: Mapping[str, Arch] = MappingProxyType(
    {
        "llama": Arch("llama", _LLAMA, _llama, permute_qk=True),
        "qwen2": Arch("qwen2", _LLAMA, _qwen("qwen2")),
        "qwen3": Arch("qwen3", {**_LLAMA, **_QK_NORM}, _qwen("qwen3")),
        "gemma2": Arch("gemma2", _GEMMA, _gemma2, norm_shift=1.0),
        "gemma3": Arch("gemma3_text", {**_GEMMA, **_QK_NORM}, _gemma3, norm_shift=1.0),
        "phi3": Arch("phi3", _PHI3, _phi3),
        "command-r": Arch("cohere", _COHERE, _command_r),
    }
)
assert tuple(ARCHS) == SUPPORTED_ARCHS


def arch_of(name: str) -> Arch:
    found = ARCHS.get(name)
    if found is None:
        raise ValueError(f"unsupported architecture {name!r} (supported: {', '.join(ARCHS)})")
    return found


def hf_name(arch: Arch, gguf_name: str) -> Optional[str]:
    """The mlx_lm parameter name for a GGUF tensor; None for tensors that only feed the config."""
    if gguf_name in _CONFIG_TENSORS:
        return None
    base, dot, part = gguf_name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}{dot}{part}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in arch.layer_names:
        return f"model.layers.{match.group(1)}.{arch.layer_names[match.group(2)]}{dot}{part}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a {arch.model_type} GGUF")


def row_heads(arch: Arch, gguf_name: str, config: Mapping[str, Any]) -> Optional[int]:
    """Heads whose rows llama.cpp permuted in this tensor (Q: all heads, K: KV heads); None if not permuted."""
    if not arch.permute_qk:
        return None
    kind = gguf_name.rsplit(".", 2)[-2] if gguf_name.count(".") >= 2 else ""
    return {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(kind)


def unpermute_rows(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows back in HF order. convert_hf_to_gguf's permute reshapes each head (n, 2, d/2).swapaxes(1, 2): a head's
    [first half | second half] rows become interleaved pairs. Inverse: (n, d/2, 2).swapaxes(1, 2)."""
    head_dim = x.shape[0] // n_heads
    return x.reshape(n_heads, head_dim // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


__all__ = ["ARCHS", "Arch", "Meta", "arch_of", "hf_name", "is_norm", "row_heads", "unpermute_rows"]
