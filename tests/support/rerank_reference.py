"""numpy reference scores for rerankers, independent of the MLX code and of mlx_server's pair preparation.

Pairs are tokenized by the `tokenizers` library's own pair encoding (`encode(query, document)`, truncating
`only_second`, as transformers' `tokenizer(query, document, truncation="only_second")` does), never by
mlx_server. Cross-encoders run embed_reference's float64 encoders (BERT / XLM-R with the pair's token types,
ModernBERT) and then the head as transformers' `…ForSequenceClassification` computes it, from the checkpoint's own
tensor names: relevance = sigmoid(logit). The Qwen3-Reranker reference is a float64 Qwen3 forward written from
transformers' `modeling_qwen3.py` (RMSNorm, per-head q/k RMSNorm, NeoX rotary, grouped-query causal attention,
SwiGLU, tied or untied head), one unpadded sequence at a time, scored as the model card does: the prompt below
(copied from the card), then softmax over the ["no", "yes"] logits at the last position, p(yes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from support.embed_reference import ACT, ModernBertReference, ReferenceEncoder, _layer_norm, _rotate, _softmax_rows


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
    return out


def _tokenizer(model_dir: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class CrossEncoderReference:
    """A `…ForSequenceClassification` checkpoint with one label, run the slow obvious way."""

    def __init__(self, model_dir: Path) -> None:
        self.cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.arch = self.cfg["model_type"]
        self.w = _tensors(model_dir)
        self.tokenizer = _tokenizer(model_dir)
        self.encoder = ModernBertReference(model_dir) if self.arch == "modernbert" else ReferenceEncoder(model_dir)

    def encode(self, query: str, document: str, max_length: int) -> tuple[list[int], list[int]]:
        self.tokenizer.enable_truncation(max_length, strategy="only_second")
        try:
            enc = self.tokenizer.encode(query, document)
        finally:
            self.tokenizer.no_truncation()
        return list(enc.ids), list(enc.type_ids)

    def logit(self, ids: list[int], types: list[int]) -> float:
        w = self.w

        def lin(name: str, x: np.ndarray) -> np.ndarray:
            bias = w.get(name + ".bias")
            return x @ w[name + ".weight"].T + (0.0 if bias is None else bias)

        if self.arch == "bert":  # BertPooler (tanh of dense on [CLS]) → classifier
            h = self.encoder.hidden_states(ids, types)  # type: ignore[call-arg]
            return float(lin("classifier", np.tanh(lin("bert.pooler.dense", h[0])))[0])
        if self.arch in ("xlm-roberta", "roberta"):  # XLMRobertaClassificationHead on <s>; one token type
            h = self.encoder.hidden_states(ids)
            return float(lin("classifier.out_proj", np.tanh(lin("classifier.dense", h[0])))[0])
        h = self.encoder.hidden_states(ids)  # ModernBERT: pooled → dense → act → norm → classifier
        pooled = h.mean(axis=0) if self.cfg.get("classifier_pooling") == "mean" else h[0]
        x = ACT[self.cfg.get("classifier_activation", "gelu")](lin("head.dense", pooled))
        x = _layer_norm(x, w["head.norm.weight"], w.get("head.norm.bias", 0.0), float(self.cfg["norm_eps"]))
        return float(lin("classifier", x)[0])

    def score(self, query: str, document: str, max_length: int) -> float:
        return sigmoid(self.logit(*self.encode(query, document, max_length)))


# The Qwen3-Reranker model card's prompt and default instruction.
QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


class Qwen3RerankerReference:
    def __init__(self, model_dir: Path) -> None:
        self.cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = _tensors(model_dir)
        self.tokenizer = _tokenizer(model_dir)

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        cfg, w = self.cfg, self.w
        eps, base = float(cfg["rms_norm_eps"]), float(cfg["rope_theta"])
        heads, kv_heads, d = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
        n = len(ids)
        causal = np.tril(np.ones((n, n), dtype=bool))
        x = w["model.embed_tokens.weight"][ids]
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"model.layers.{i}."
            h = _rms(x, w[p + "input_layernorm.weight"], eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, d)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, d)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, d)
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, w[p + "self_attn.k_norm.weight"], eps)
            ctx = np.empty((n, heads, d))
            for j in range(heads):
                g = j // (heads // kv_heads)  # the key/value head this query head shares
                scores = _rotate(q[:, j], base, d, False) @ _rotate(k[:, g], base, d, False).T / math.sqrt(d)
                ctx[:, j] = _softmax_rows(np.where(causal, scores, -np.inf)) @ v[:, g]
            x = x + ctx.reshape(n, heads * d) @ w[p + "self_attn.o_proj.weight"].T
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        return _rms(x, w["model.norm.weight"], eps)

    def encode(self, query: str, document: str, max_length: int, instruction: Optional[str] = None) -> list[int]:
        tok = self.tokenizer
        prefix = tok.encode(QWEN3_PREFIX, add_special_tokens=False).ids
        suffix = tok.encode(QWEN3_SUFFIX, add_special_tokens=False).ids
        body = f"<Instruct>: {instruction or QWEN3_TASK}\n<Query>: {query}\n<Document>: {document}"
        tok.enable_truncation(max_length - len(prefix) - len(suffix))
        try:
            ids = tok.encode(body).ids
        finally:
            tok.no_truncation()
        return list(prefix) + list(ids) + list(suffix)

    def score_ids(self, ids: list[int]) -> float:
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        logits = head @ self.hidden_states(ids)[-1]
        yes, no = self.tokenizer.token_to_id("yes"), self.tokenizer.token_to_id("no")
        pair = np.array([logits[no], logits[yes]])
        pair = np.exp(pair - pair.max())
        return float(pair[1] / pair.sum())

    def score(self, query: str, document: str, max_length: int, instruction: Optional[str] = None) -> float:
        return self.score_ids(self.encode(query, document, max_length, instruction))


__all__ = ["CrossEncoderReference", "Qwen3RerankerReference", "sigmoid"]
