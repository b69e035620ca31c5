"""Whether a model directory holds a reranker, and how it scores a (query, document) pair: read from files, no MLX.

Two families score pairs:
- cross-encoders, an encoder with a sequence-classification head (`BertForSequenceClassification`: the ms-marco
  MiniLM family; `XLMRobertaForSequenceClassification`: bge-reranker-base / -v2-m3;
  `ModernBertForSequenceClassification`). With one label (`id2label` / `num_labels`) the relevance is the sigmoid
  of its logit, as sentence-transformers' `CrossEncoder` scores a one-label head. A head with several labels is a
  classifier (NLI and the like), not a reranker.
- decoder rerankers (Qwen3-Reranker): a causal LM asked a fixed yes/no question about the pair; the relevance is
  p("yes") against p("no") at the last position. Their config.json is a plain `Qwen3ForCausalLM`, so only their
  name tells them apart from a chat model: the model directory's name (or the hub repo it was downloaded from,
  `models--Qwen--Qwen3-Reranker-0.6B`) or `_name_or_path` says "reranker", else models.yaml says `kind: rerank`.

`kind` is models.yaml's explicit kind: "rerank" makes the model a reranker (its head then comes from its
architecture), any other kind makes it not one, None infers from the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from mlx_server.models.embedinfo import DECODER_TYPES, ENCODER_TYPES, EmbeddingInfo, Pooling, embedding_info

RERANK_KINDS = frozenset({"rerank", "reranker"})
# Encoder families with a cross-encoder head we run (model_type → the embedder architecture underneath).
CROSS_ENCODER_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "xlm-roberta",
    "xlm-roberta": "xlm-roberta",
    "modernbert": "modernbert",
}
Head = Literal["classifier", "yes-no"]


@dataclass(frozen=True)
class DecoderPrompt:
    """The fixed prompt a decoder reranker was trained on; `body` takes {instruction}, {query} and {document}."""

    prefix: str
    body: str
    suffix: str
    instruction: str  # the task line when the request names none
    yes: str = "yes"
    no: str = "no"

    def head(self, query: str, instruction: Optional[str]) -> str:
        """The body up to the document: the part truncation must never cut."""
        return self.body.split("{document}")[0].format(instruction=instruction or self.instruction, query=query)


# From the Qwen3-Reranker model card (the transformers usage example, whose scores this reproduces).
QWEN3_RERANKER = DecoderPrompt(
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    ),
    body="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    instruction="Given a web search query, retrieve relevant passages that answer the query",
)


@dataclass(frozen=True)
class RerankInfo:
    """What the files say about scoring pairs with this model."""

    architecture: str  # "bert" | "xlm-roberta" | "modernbert" | a decoder model_type
    head: Head
    pooling: Pooling  # what the head reads: "cls" (the first token), "mean" (ModernBERT's option), "last" (decoders)
    labels: int  # outputs of a classifier head (a reranker's has one); 0 for a decoder
    max_length: int  # most tokens per pair, special tokens included
    dimensions: int  # hidden width
    source: str  # why we believe it: "config" | "name" | "override"
    prompt: Optional[DecoderPrompt] = None  # a decoder reranker's

    @property
    def encoder(self) -> EmbeddingInfo:
        """The model as the embedding machinery sees it (files, tokenizer, loading, memory): no embedder itself."""
        return EmbeddingInfo(
            is_embedding=False,
            architecture=self.architecture,
            pooling=self.pooling,
            normalize=False,
            max_length=self.max_length,
            dimensions=self.dimensions,
            source=self.source,
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def labels_of(cfg: dict[str, Any]) -> int:
    """A classifier head's output count, as transformers' PretrainedConfig reads it (2 when nothing says)."""
    if isinstance(cfg.get("id2label"), dict) and cfg["id2label"]:
        return len(cfg["id2label"])
    if isinstance(cfg.get("num_labels"), int) and not isinstance(cfg["num_labels"], bool):
        return int(cfg["num_labels"])
    return 2


def named_reranker(model_dir: Path, cfg: dict[str, Any]) -> bool:
    """The directory, the hub repo it was downloaded into (`models--org--name`) or `_name_or_path` says reranker."""
    names = [model_dir.name, str(cfg.get("_name_or_path") or "")]
    names += [p.name for p in model_dir.parents if p.name.startswith("models--")][:1]
    return any("reranker" in name.lower() for name in names)


def _positions(model_dir: Path) -> tuple[int, int]:
    """(most tokens per input, hidden width), as the embedding machinery reads them."""
    try:
        emb = embedding_info(model_dir, "embedding")
    except ValueError:
        return 512, 0
    return emb.max_length, emb.dimensions


def rerank_info(model_dir: Path, kind: Optional[str] = None) -> Optional[RerankInfo]:
    """Read `model_dir` and say whether (and how) it scores pairs; None when it is no reranker."""
    model_dir = Path(model_dir)
    if kind is not None and kind.strip().lower() not in RERANK_KINDS:
        return None
    cfg = _read_json(model_dir / "config.json")
    if not isinstance(cfg, dict):
        return None
    forced = kind is not None
    model_type = str(cfg.get("model_type", "") or "")
    archs = [str(a) for a in cfg.get("architectures") or []]
    if model_type in CROSS_ENCODER_TYPES:
        labels = labels_of(cfg)
        classifier = any(a.endswith("ForSequenceClassification") for a in archs)
        if not forced and not (classifier and labels == 1):
            return None
        pooling: Pooling = "cls"
        if model_type == "modernbert" and cfg.get("classifier_pooling") == "mean":
            pooling = "mean"
        max_length, width = _positions(model_dir)
        source = "override" if forced else "config"
        return RerankInfo(CROSS_ENCODER_TYPES[model_type], "classifier", pooling, labels, max_length, width, source)
    if model_type in ENCODER_TYPES or not model_type:
        return None  # an encoder with no cross-encoder head we run (nomic-bert), or no architecture at all
    causal = not archs or any(a.endswith("ForCausalLM") for a in archs)
    named = model_type in DECODER_TYPES and causal and named_reranker(model_dir, cfg)
    if not (named or forced):
        return None
    max_length, width = _positions(model_dir)
    source = "override" if forced else "name"
    return RerankInfo(model_type, "yes-no", "last", 0, max_length, width, source, QWEN3_RERANKER)


__all__ = [
    "CROSS_ENCODER_TYPES",
    "DecoderPrompt",
    "QWEN3_RERANKER",
    "RERANK_KINDS",
    "RerankInfo",
    "labels_of",
    "named_reranker",
    "rerank_info",
]
