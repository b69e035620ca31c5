"""Whether a model directory holds an embedding model, and how to pool it: read from files, no MLX.

Sentence-transformers checkpoints say it themselves: `modules.json` lists Transformer → Pooling (→ Normalize), and
`1_Pooling/config.json` names the pooling mode; `sentence_bert_config.json` caps the sequence length (256 for
all-MiniLM-L6-v2, below its 512 positions — sentence-transformers truncates there, so we do too). Without those
files the architecture decides: encoder-only models (BERT, XLM-RoBERTa, nomic-bert, ModernBERT) cannot generate,
so they embed with mean pooling; a decoder's bare base model (`Qwen3Model`, no LM head) embeds with last-token
pooling, as Qwen3-Embedding does. models.yaml may state `kind` explicitly; `embedding_info(..., kind=...)` takes
it as an override.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

Pooling = Literal["mean", "cls", "last", "max", "mean_sqrt_len"]

# model_type → the architecture our embedders implement. Encoders only: none of these can generate text.
ENCODER_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "xlm-roberta",  # RoBERTa is XLM-R's architecture with a different vocabulary
    "xlm-roberta": "xlm-roberta",
    "nomic_bert": "nomic_bert",
    "modernbert": "modernbert",
}
# Decoder families whose bare base model (architectures ["<X>Model"], no LM head) is an embedding model.
DECODER_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text"})
# Heads that make an encoder a classifier or a reranker rather than an embedder.
_CLASSIFIER_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
)
# sentence-transformers module types we know how to run (anything else, e.g. Dense, changes the vectors).
_KNOWN_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})
# 1_Pooling/config.json flag → our pooling name, in sentence-transformers' own order.
_POOLING_FLAGS: tuple[tuple[str, Pooling], ...] = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ("pooling_mode_lasttoken", "last"),
)
_POOLING_NAMES: dict[str, Pooling] = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "lasttoken": "last",
    "last": "last",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True)
class EmbeddingInfo:
    """What the files say about embedding with this model."""

    is_embedding: bool
    architecture: str  # "bert" | "xlm-roberta" | "nomic_bert" | "modernbert" | a decoder model_type | "unknown"
    pooling: Pooling
    normalize: bool  # the checkpoint's own Normalize module (Ollama normalizes every vector regardless)
    max_length: int  # most tokens per input, special tokens included
    dimensions: int  # width of one vector
    source: str  # why we believe it: "sentence-transformers" | "config" | "override"
    unsupported: tuple[str, ...] = ()  # sentence-transformers modules we cannot run (e.g. Dense): refuse the model


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pooling_from_config(cfg: dict[str, Any]) -> Pooling:
    """1_Pooling/config.json → one pooling mode. Several at once (their concatenation) is not supported."""
    mode = cfg.get("pooling_mode")  # newer sentence-transformers may also write the mode by name
    if isinstance(mode, str) and mode in _POOLING_NAMES:
        return _POOLING_NAMES[mode]
    chosen = [name for flag, name in _POOLING_FLAGS if cfg.get(flag)]
    if cfg.get("pooling_mode_weightedmean_tokens"):
        raise ValueError("weighted-mean pooling is not supported")
    if len(chosen) > 1:
        raise ValueError(f"combined pooling modes {chosen} (concatenated vectors) are not supported")
    return chosen[0] if chosen else "mean"


def _position_limit(cfg: dict[str, Any], architecture: str) -> int:
    positions = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 512)
    if architecture == "xlm-roberta":
        # XLM-R numbers positions from padding_idx + 1, so its 514 position rows hold 512 tokens.
        pad = cfg.get("pad_token_id")
        positions -= (1 if pad is None else int(pad)) + 1
    if architecture == "nomic_bert" and cfg.get("max_trained_positions"):
        # nomic-embed-text says n_positions 8192 but was trained on 2048 (past it, its dynamic-NTK rope would make a
        # vector depend on the batch's padded length); Ollama serves it with a 2048 context too.
        positions = min(positions, int(cfg["max_trained_positions"]))
    return max(positions, 1)


def _architecture(cfg: dict[str, Any]) -> tuple[str, Optional[bool], Pooling]:
    """(architecture, embeds? — None when the config cannot tell, default pooling) from config.json alone."""
    model_type = str(cfg.get("model_type", "") or "")
    archs = [str(a) for a in cfg.get("architectures") or []]
    if model_type in ENCODER_TYPES:
        if archs and all(a.endswith(_CLASSIFIER_SUFFIXES) for a in archs):
            return ENCODER_TYPES[model_type], False, "mean"  # a cross-encoder / classifier head: not an embedder
        return ENCODER_TYPES[model_type], True, "mean"
    if model_type in DECODER_TYPES:
        # `Qwen3Model` (no head) embeds; `Qwen3ForCausalLM` generates unless its files or models.yaml say otherwise.
        bare = bool(archs) and all(a.endswith("Model") for a in archs)
        return model_type, True if bare else None, "last"
    return model_type or "unknown", None, "mean"


def embedding_info(model_dir: Path, kind: Optional[str] = None) -> EmbeddingInfo:
    """Read `model_dir` and say whether (and how) it embeds.

    `kind` is models.yaml's explicit `kind`: "embedding" makes the model an embedding model whatever its files
    say (pooling still comes from its files, or the architecture's default); any other value ("generate", ...)
    makes it not one; None infers from the files. Raises ValueError for a config.json that is missing or not
    JSON, or a sentence-transformers pooling this server cannot reproduce.
    """
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{model_dir / 'config.json'} is missing or not a JSON object")
    architecture, embeds, pooling = _architecture(cfg)
    dimensions = int(cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd") or 0)
    max_length = _position_limit(cfg, architecture)
    normalize = False
    source = "config"
    unsupported: tuple[str, ...] = ()

    modules = _read_json(model_dir / "modules.json")
    if isinstance(modules, list) and modules:
        types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
        if "Pooling" in types:
            source, embeds = "sentence-transformers", True
            pool_dir = next(
                str(m.get("path", ""))
                for m in modules
                if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")
            )
            pool_cfg = _read_json(model_dir / pool_dir / "config.json")
            if isinstance(pool_cfg, dict):
                pooling = _pooling_from_config(pool_cfg)
                dimensions = int(pool_cfg.get("word_embedding_dimension") or dimensions)
            normalize = "Normalize" in types
            unsupported = tuple(t for t in types if t not in _KNOWN_MODULES)
        st_cfg = _read_json(model_dir / "sentence_bert_config.json")
        if isinstance(st_cfg, dict) and isinstance(st_cfg.get("max_seq_length"), int) and st_cfg["max_seq_length"] > 0:
            max_length = min(max_length, int(st_cfg["max_seq_length"]))

    if kind is not None:
        source = "override"
        embeds = kind.strip().lower() in ("embedding", "embed", "embeddings")
    return EmbeddingInfo(
        is_embedding=bool(embeds),
        architecture=architecture,
        pooling=pooling,
        normalize=normalize,
        max_length=max_length,
        dimensions=dimensions,
        source=source,
        unsupported=unsupported,
    )


__all__ = ["DECODER_TYPES", "ENCODER_TYPES", "EmbeddingInfo", "Pooling", "embedding_info"]
