"""Tiny random-weight rerankers in the layouts real ones use: cross-encoders (BERT as the ms-marco MiniLM family,
XLM-RoBERTa as bge-reranker, ModernBERT) and a Qwen3-Reranker-style decoder.

Each cross-encoder is one of tinyembedders' encoders saved as its `…ForSequenceClassification` task model: the
encoder under its task prefix (`bert.`, `roberta.`, `model.`), the classification head under Hugging Face's names,
one label, and no sentence-transformers files. The decoder is tinymodels' qwen3 with "yes" and "no" added to its
vocabulary (the tiny BPE has neither as one token) and their rows of the tied embedding drawn to give logits of
order one, so p(yes) spreads over (0, 1); it is found by its directory's name, as Qwen3-Reranker is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from support.tinyembedders import HIDDEN, build_tiny_encoder, build_tiny_modernbert

# The classification head scaled so a pair's logit is of order one: sigmoid neither saturates nor flattens.
HEAD_STD = 0.4


def _rewrite(out: Path, config: dict, drop: tuple[str, ...], add: dict[str, np.ndarray]) -> None:
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if not k.startswith(drop)}
    save_file({**weights, **add}, str(out / "model.safetensors"))
    for extra in ("modules.json",):
        (out / extra).unlink(missing_ok=True)


def build_tiny_cross_encoder(out: Path, *, arch: str = "bert", seed: int = 0, labels: int = 1,
                             pooling: str = "cls") -> Path:
    """A tiny random `arch` ("bert" | "xlm-roberta" | "modernbert") cross-encoder in `out`; returns `out`.
    labels: the head's outputs (a reranker has one). pooling: ModernBERT's classifier_pooling ("cls" | "mean")."""
    out = Path(out)
    rng = np.random.default_rng(seed + 100)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    id2label = {str(i): f"LABEL_{i}" for i in range(labels)}
    common = {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
    if arch == "modernbert":
        build_tiny_modernbert(out, seed=seed, prefix="model.")
        head = {"head.dense.weight": normal(HIDDEN, HIDDEN, std=0.3), "head.norm.weight": 1.0 + normal(HIDDEN, std=0.1),
                "classifier.weight": normal(labels, HIDDEN, std=HEAD_STD), "classifier.bias": normal(labels, std=0.1)}
        _rewrite(out, {**common, "architectures": ["ModernBertForSequenceClassification"],
                       "classifier_pooling": pooling, "classifier_activation": "gelu"},
                 ("head.", "decoder."), head)
    elif arch == "bert":
        build_tiny_encoder(out, arch="bert", seed=seed, pooling=None, prefix="bert.")
        # The encoder's pooler (bert.pooler.dense) is the head's first layer; the MLM head goes.
        head = {"classifier.weight": normal(labels, HIDDEN, std=HEAD_STD), "classifier.bias": normal(labels, std=0.1)}
        _rewrite(out, {**common, "architectures": ["BertForSequenceClassification"]}, ("cls.",), head)
    else:
        build_tiny_encoder(out, arch="xlm-roberta", seed=seed, pooling=None, prefix="roberta.")
        head = {"classifier.dense.weight": normal(HIDDEN, HIDDEN, std=0.3),
                "classifier.dense.bias": normal(HIDDEN, std=0.1),
                "classifier.out_proj.weight": normal(labels, HIDDEN, std=HEAD_STD),
                "classifier.out_proj.bias": normal(labels, std=0.1)}
        _rewrite(out, {**common, "architectures": ["XLMRobertaForSequenceClassification"]},
                 ("cls.", "roberta.pooler."), head)
    return out


QWEN3_HIDDEN = 64
QWEN3_POSITIONS = 256


def build_tiny_qwen3_reranker(out: Path, *, seed: int = 0, tied: bool = True) -> Path:
    """A tiny random Qwen3-Reranker-style checkpoint (Qwen3ForCausalLM, "yes" and "no" tokens). Name `out` with
    "reranker" in it to have it found as one (as `Qwen3-Reranker-0.6B` is); otherwise models.yaml must say
    `kind: rerank`. tied=False gives it an `lm_head` of its own (Qwen3-Reranker-8B's layout)."""
    from support.tinymodels import build_tiny_model  # mlx-based; only this builder needs it

    out = build_tiny_model(Path(out), arch="qwen3", hidden_size=QWEN3_HIDDEN, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=QWEN3_POSITIONS, seed=seed)
    tok = json.loads((out / "tokenizer.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    for i, word in enumerate(("yes", "no")):
        tok["added_tokens"].append({"id": vocab + i, "content": word, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
    (out / "tokenizer.json").write_text(json.dumps(tok))
    rng = np.random.default_rng(seed + 7)
    weights = load_file(str(out / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = np.concatenate(
        [embed, rng.normal(0.0, 0.12, size=(2, QWEN3_HIDDEN)).astype(embed.dtype)])
    if not tied:
        weights["lm_head.weight"] = rng.normal(0.0, 0.15, size=(vocab + 2, QWEN3_HIDDEN)).astype(embed.dtype)
    cfg.update(vocab_size=vocab + 2, tie_word_embeddings=tied)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights, str(out / "model.safetensors"))
    return out


__all__ = ["build_tiny_cross_encoder", "build_tiny_qwen3_reranker"]
