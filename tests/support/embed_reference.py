"""numpy reference forward passes for sentence embeddings, independent of the MLX code.

BERT / XLM-RoBERTa (`ReferenceEncoder`) are written from the Hugging Face `BertModel` / `XLMRobertaModel`
definitions; nomic-bert (`NomicReference`) from the model's published description: Nomic's own modeling code
(`modeling_hf_nomic_bert.py`, which the hub checkpoints load with trust_remote_code) and the nomic-bert-2048 model
card; ModernBERT (`ModernBertReference`) from transformers' `modeling_modernbert.py` and the ModernBERT paper. All
pool as sentence-transformers' Pooling and Normalize modules do. Each reads the checkpoint's own tensor names (no
renaming shared with mlx_server) and runs in float64, one sequence at a time with no padding and no mask — so a
masking or padding bug in the MLX embedder cannot cancel out against the same bug here. torch stays out of the
test dependencies (PyPI's torch is the multi-GB CUDA build).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors.numpy import load_file

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACT = {"gelu": _gelu_exact, "gelu_new": _gelu_tanh, "relu": lambda x: np.maximum(x, 0.0)}


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


class ReferenceEncoder:
    """The checkpoint in `model_dir`, run the slow obvious way."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        self.cfg: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        tensors: dict[str, np.ndarray] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        # Checkpoints saved from a task model prefix the encoder with its base-model attribute name.
        prefix = next((p for p in ("bert.", "roberta.", "") if f"{p}embeddings.word_embeddings.weight" in tensors), "")
        self.w = {k[len(prefix):]: v.astype(np.float64) for k, v in tensors.items() if k.startswith(prefix)}
        self.xlmr = self.cfg.get("model_type") in ("xlm-roberta", "roberta")

    def hidden_states(self, ids: list[int], types: Optional[list[int]] = None) -> np.ndarray:
        """`types`: a pair's token types (a cross-encoder's); None, one segment (type 0)."""
        cfg, w = self.cfg, self.w
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        heads = int(cfg["num_attention_heads"])
        n = len(ids)
        if self.xlmr:
            # XLMRobertaEmbeddings.create_position_ids_from_input_ids: padding_idx + 1, +2, ... for real tokens.
            positions = np.arange(n) + int(cfg.get("pad_token_id", 1)) + 1
        else:
            positions = np.arange(n)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][
                 np.zeros(n, dtype=np.int64) if types is None else np.asarray(types)])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        act = ACT[str(cfg.get("hidden_act", "gelu"))]
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."

            def lin(name: str, t: np.ndarray) -> np.ndarray:
                return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (lin(f"attention.self.{m}", x) for m in ("query", "key", "value"))
            d = q.shape[-1] // heads
            ctx = np.empty_like(q)
            for h in range(heads):  # head by head, plainly
                sl = slice(h * d, (h + 1) * d)
                scores = q[:, sl] @ k[:, sl].T / math.sqrt(d)
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                ctx[:, sl] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[:, sl]
            x = _layer_norm(x + lin("attention.output.dense", ctx), w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], eps)
            ffn = lin("output.dense", act(lin("intermediate.dense", x)))
            x = _layer_norm(x + ffn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        return x

    def embed(self, ids: list[int], pooling: str = "mean") -> np.ndarray:
        return pool_and_normalize(self.hidden_states(ids), pooling)


def pool_and_normalize(h: np.ndarray, pooling: str) -> np.ndarray:
    """sentence-transformers Pooling (one mode) then Normalize, for one unpadded sequence's hidden states."""
    if pooling == "mean":
        v = h.mean(axis=0)
    elif pooling == "cls":
        v = h[0]
    elif pooling == "last":
        v = h[-1]
    elif pooling == "max":
        v = h.max(axis=0)
    else:
        raise ValueError(pooling)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _load(model_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
    return cfg, tensors


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


def _rotate(x: np.ndarray, base: float, rot: int, interleaved: bool) -> np.ndarray:
    """Rotary position embedding of one head's (n, head_dim) vectors, position t = row index: the first `rot`
    dimensions form rot/2 pairs, pair i turned by angle t * base^(-2i/rot). GPT-NeoX layout pairs dimension i with
    i + rot/2; the interleaved (GPT-J) layout pairs 2i with 2i + 1. The rest pass through."""
    n = x.shape[0]
    angle = np.arange(n, dtype=np.float64)[:, None] * base ** (-np.arange(0, rot, 2, dtype=np.float64) / rot)
    cos, sin = np.cos(angle), np.sin(angle)
    out = x.copy()
    if interleaved:
        a, b = x[:, 0:rot:2], x[:, 1:rot:2]
        out[:, 0:rot:2], out[:, 1:rot:2] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[:, : rot // 2], x[:, rot // 2: rot]
        out[:, : rot // 2], out[:, rot // 2: rot] = a * cos - b * sin, b * cos + a * sin
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_GATES = {"swiglu": lambda x: x * _sigmoid(x), "geglu": _gelu_exact, "glu": _sigmoid}


class NomicReference:
    """nomic-bert: BERT with rotary q/k instead of a position table, a fused (q | k | v) projection, a gated MLP
    `fc2(fc11(x) * act(fc12(x)))` and post-norm residuals (norm1 after attention, norm2 after the MLP)."""

    def __init__(self, model_dir: Path) -> None:
        self.cfg, tensors = _load(model_dir)
        prefix = "bert." if "bert.emb_ln.weight" in tensors else ""
        self.w = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        cfg, w = self.cfg, self.w
        eps = float(cfg["layer_norm_epsilon"])
        heads, width = int(cfg["n_head"]), int(cfg["n_embd"])
        d = width // heads
        rot = int(d * float(cfg["rotary_emb_fraction"]))
        gate = _GATES[cfg["activation_function"]]

        def lin(name: str, t: np.ndarray) -> np.ndarray:
            bias = w.get(name + ".bias")
            return t @ w[name + ".weight"].T + (0.0 if bias is None else bias)

        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["emb_ln.weight"], w["emb_ln.bias"], eps)
        for i in range(int(cfg["n_layer"])):
            p = f"encoder.layers.{i}."
            qkv = lin(p + "attn.Wqkv", x)
            q, k, v = qkv[:, :width], qkv[:, width: 2 * width], qkv[:, 2 * width:]
            ctx = np.empty_like(q)
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                qh = _rotate(q[:, sl], float(cfg["rotary_emb_base"]), rot, bool(cfg["rotary_emb_interleaved"]))
                kh = _rotate(k[:, sl], float(cfg["rotary_emb_base"]), rot, bool(cfg["rotary_emb_interleaved"]))
                ctx[:, sl] = _softmax_rows(qh @ kh.T / math.sqrt(d)) @ v[:, sl]
            x = _layer_norm(x + lin(p + "attn.out_proj", ctx), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
            mlp = lin(p + "mlp.fc2", lin(p + "mlp.fc11", x) * gate(lin(p + "mlp.fc12", x)))
            x = _layer_norm(x + mlp, w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        return x

    def embed(self, ids: list[int], pooling: str = "mean") -> np.ndarray:
        return pool_and_normalize(self.hidden_states(ids), pooling)


class ModernBertReference:
    """ModernBERT: pre-norm blocks (layer 0 has no attention norm), bias-free LayerNorms and projections, rotary
    q/k, every third layer (0, 3, ...) global and the others within local_attention/2 positions, a GeGLU MLP
    (`Wi` → input, gate; `Wo(gelu(input) * gate)`) and a final norm."""

    def __init__(self, model_dir: Path) -> None:
        self.cfg, tensors = _load(model_dir)
        prefix = "model." if "model.final_norm.weight" in tensors else ""
        self.w = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return _layer_norm(x, self.w[name + ".weight"], self.w.get(name + ".bias", 0.0), float(self.cfg["norm_eps"]))

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        cfg, w = self.cfg, self.w
        heads, width = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        d = width // heads
        n = len(ids)
        if "layer_types" in cfg:
            is_global = [t == "full_attention" for t in cfg["layer_types"]]
            thetas = {True: cfg["rope_parameters"]["full_attention"]["rope_theta"],
                      False: cfg["rope_parameters"]["sliding_attention"]["rope_theta"]}
        else:
            is_global = [i % int(cfg["global_attn_every_n_layers"]) == 0 for i in range(int(cfg["num_hidden_layers"]))]
            thetas = {True: cfg["global_rope_theta"], False: cfg["local_rope_theta"]}
        distance = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
        x = self._norm(w["embeddings.tok_embeddings.weight"][ids], "embeddings.norm")
        for i, full in enumerate(is_global):
            p = f"layers.{i}."
            h = x if i == 0 else self._norm(x, p + "attn_norm")
            qkv = h @ w[p + "attn.Wqkv.weight"].T
            q, k, v = qkv[:, :width], qkv[:, width: 2 * width], qkv[:, 2 * width:]
            ctx = np.empty_like(q)
            for j in range(heads):
                sl = slice(j * d, (j + 1) * d)
                scores = _rotate(q[:, sl], float(thetas[full]), d, False) @ _rotate(k[:, sl], float(thetas[full]), d,
                                                                                    False).T / math.sqrt(d)
                if not full:
                    scores = np.where(distance <= int(cfg["local_attention"]) // 2, scores, -np.inf)
                ctx[:, sl] = _softmax_rows(scores) @ v[:, sl]
            x = x + ctx @ w[p + "attn.Wo.weight"].T
            inp, gate = np.split(self._norm(x, p + "mlp_norm") @ w[p + "mlp.Wi.weight"].T, 2, axis=-1)
            x = x + (ACT[cfg["hidden_activation"]](inp) * gate) @ w[p + "mlp.Wo.weight"].T
        return self._norm(x, "final_norm")

    def embed(self, ids: list[int], pooling: str = "mean") -> np.ndarray:
        return pool_and_normalize(self.hidden_states(ids), pooling)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
