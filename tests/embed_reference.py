"""A numpy reference forward pass for BERT / XLM-RoBERTa sentence embeddings, independent of the MLX code.

Written from the Hugging Face `BertModel` / `XLMRobertaModel` definitions and sentence-transformers' Pooling and
Normalize modules, against the checkpoint's own tensor names (no renaming shared with mlx_server), in float64, one
sequence at a time with no padding and no mask — so a masking or padding bug in the MLX embedder cannot cancel
out against the same bug here. torch stays out of the test dependencies (PyPI's torch is the multi-GB CUDA build).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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

    def hidden_states(self, ids: list[int]) -> np.ndarray:
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
             + w["embeddings.token_type_embeddings.weight"][np.zeros(n, dtype=np.int64)])
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
        """sentence-transformers Pooling (one mode) then Normalize, for one unpadded sequence."""
        h = self.hidden_states(ids)
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


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
