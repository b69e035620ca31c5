"""Rerankers in MLX: a (query, document) pair in, its relevance in [0, 1] out.

- Cross-encoders are one of our encoders (bert.py for BERT and XLM-RoBERTa, modernbert.py) with the checkpoint's
  sequence-classification head on top, as Hugging Face's `…ForSequenceClassification` runs it:
  BERT: `classifier(tanh(pooler.dense(h[CLS])))`; XLM-R: `out_proj(tanh(dense(h[<s>])))` (the same computation
  under other names); ModernBERT: `classifier(norm(act(head.dense(pooled))))`, pooled on [CLS] or the masked mean
  (`classifier_pooling`). BERT reads the pair's token types (0 for the query, 1 for the document); XLM-R and
  ModernBERT have none. The relevance is the sigmoid of the one logit.
- Decoder rerankers (Qwen3-Reranker) are mlx_lm's own model class with its head: the relevance is p("yes") against
  p("no") as the next token after the fixed prompt, i.e. sigmoid(logit_yes - logit_no), which is exactly the
  reference's softmax over the two. Only the last real token's hidden state goes through the head, so a pass never
  makes (batch × length × vocabulary) logits.

Batches are right-padded: encoders mask the pads out of attention and pooling; causal attention keeps them out of
a decoder's view of every real token, and the head reads each row at its own last real token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_server.engine.model.embedders import bert, modernbert
from mlx_server.engine.model.embedders.activations import ACTIVATIONS
from mlx_server.engine.model.embedders.loaded import LoadedEncoder
from mlx_server.engine.model.embedders.weights import load_weights
from mlx_server.engine.prepare.embed_tokenizer import EmbedTokenizer
from mlx_server.models.rerankinfo import RerankInfo


class TanhHead(nn.Module):
    """BERT's pooler and classifier, or XLM-R's classification head: out(tanh(dense(h[first token])))."""

    def __init__(self, width: int, labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.out = nn.Linear(width, labels)

    def __call__(self, hidden: mx.array, mask: mx.array) -> mx.array:
        return self.out(mx.tanh(self.dense(hidden[:, 0])))


class ModernBertHead(nn.Module):
    """ModernBERT's prediction head and classifier, on [CLS] or the mean of the real tokens."""

    def __init__(self, cfg: dict[str, Any], width: int, labels: int) -> None:
        super().__init__()
        act = str(cfg.get("classifier_activation") or cfg.get("hidden_activation") or "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported ModernBERT classifier_activation {act!r}")
        self.dense = nn.Linear(width, width, bias=bool(cfg.get("classifier_bias", False)))
        self.norm = nn.LayerNorm(width, eps=float(cfg.get("norm_eps", 1e-5)), bias=bool(cfg.get("norm_bias", False)))
        self.out = nn.Linear(width, labels)
        self.act = ACTIVATIONS[act]
        self.mean = cfg.get("classifier_pooling") == "mean"

    def __call__(self, hidden: mx.array, mask: mx.array) -> mx.array:
        if self.mean:
            real = mask.astype(hidden.dtype)[..., None]
            pooled = (hidden * real).sum(axis=1) / real.sum(axis=1)
        else:
            pooled = hidden[:, 0]
        return self.out(self.norm(self.act(self.dense(pooled))))


class CrossEncoder(nn.Module):
    """Token ids, the real-token mask and token types (batch, length) → one logit per pair (batch,)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, token_types: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.token_types = token_types  # the encoder has a second segment embedding (BERT's type_vocab_size 2)

    def __call__(self, ids: mx.array, mask: mx.array, types: mx.array) -> mx.array:
        hidden = self.encoder(ids, mask, types) if self.token_types else self.encoder(ids, mask)
        return self.head(hidden, mask)[:, 0]


class YesNoDecoder(nn.Module):
    """An mlx_lm causal LM read at each row's last real token: logit("yes") - logit("no"), (batch,)."""

    def __init__(self, lm: nn.Module, yes: int, no: int) -> None:
        super().__init__()
        self.lm = lm
        self.yes = yes
        self.no = no

    def __call__(self, ids: mx.array, mask: mx.array, types: mx.array) -> mx.array:
        hidden = self.lm.model(ids)
        last = (mask.astype(mx.int32).sum(axis=1) - 1)[:, None, None]
        h = mx.take_along_axis(hidden, last, axis=1)  # (batch, 1, width)
        # An untied head is `lm_head`; a tied one (Qwen3-Reranker-0.6B / 4B) is the embedding read backwards.
        logits = self.lm.lm_head(h) if "lm_head" in self.lm else self.lm.model.embed_tokens.as_linear(h)
        logits = logits[:, 0].astype(mx.float32)
        return logits[:, self.yes] - logits[:, self.no]


class Reranker(LoadedEncoder):
    """One loaded reranker. Only the inference thread may call `score` (it runs MLX)."""

    info: RerankInfo

    def score(self, batch: Sequence[Sequence[int]], firsts: Sequence[int]) -> mx.array:
        """Pairs as token ids, each with the index its document segment starts at → evaluated float32 relevance
        (len(batch),) in [0, 1]. Rows may have any lengths up to max_length: they are padded here, with a mask."""
        if not batch:
            return mx.zeros((0,), dtype=mx.float32)
        lengths = [len(row) for row in batch]
        if min(lengths) == 0:
            raise ValueError("cannot score an empty pair")
        if max(lengths) > self.max_length:
            raise ValueError(f"a pair of {max(lengths)} tokens exceeds the model's {self.max_length}")
        width = max(lengths)
        # Pad id 0: pads are masked out of an encoder's attention and pooling, and after a decoder's last token.
        ids = mx.array([list(row) + [0] * (width - len(row)) for row in batch], dtype=mx.int32)
        positions = mx.arange(width)[None, :]
        mask = positions < mx.array(lengths)[:, None]
        types = mx.logical_and(positions >= mx.array(list(firsts))[:, None], mask).astype(mx.int32)
        scores = mx.sigmoid(self.model(ids, mask, types).astype(mx.float32))
        mx.eval(scores)
        return scores


# Checkpoint name prefix of the head's tensors → ours (under `head.`), per architecture, first match wins.
_HEAD_TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "bert": (("bert.pooler.dense.", "dense."), ("pooler.dense.", "dense."), ("classifier.", "out.")),
    "xlm-roberta": (("classifier.dense.", "dense."), ("classifier.out_proj.", "out.")),
    "modernbert": (("head.dense.", "dense."), ("head.norm.", "norm."), ("classifier.", "out.")),
}


def _head_name(name: str, architecture: str) -> Optional[str]:
    for old, new in _HEAD_TENSORS[architecture]:
        if name.startswith(old):
            return "head." + new + name[len(old) :]
    return None


def _cross_encoder(path: Path, cfg: dict[str, Any], info: RerankInfo) -> tuple[nn.Module, int]:
    """The encoder and its classification head, loaded strictly from one checkpoint → (module, most tokens)."""
    archs = [str(a) for a in cfg.get("architectures") or []]
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{', '.join(archs)} has no sequence-classification head to score pairs with")
    if info.labels != 1:
        raise ValueError(f"a reranker's classifier has one label; this one has {info.labels} (a classifier)")
    encoder: nn.Module
    head: nn.Module
    if info.architecture == "modernbert":
        mb_cfg = modernbert.ModernBertConfig.from_dict(cfg)
        encoder, head = modernbert.ModernBertModel(mb_cfg), ModernBertHead(cfg, mb_cfg.hidden_size, 1)
        positions, renames, types = mb_cfg.max_tokens, modernbert.sanitize, False
    else:
        bert_cfg = bert.BertConfig.from_dict(cfg, info.architecture)
        encoder, head = bert.BertModel(bert_cfg), TanhHead(bert_cfg.hidden_size, 1)
        positions, renames, types = bert_cfg.max_tokens, bert.sanitize, bert_cfg.type_vocab_size > 1

    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        heads: dict[str, mx.array] = {}
        rest: dict[str, mx.array] = {}
        for name, value in weights.items():
            ours = _head_name(name, info.architecture)
            if ours is None:
                rest[name] = value
            else:
                heads[ours] = value
        return {**{f"encoder.{k}": v for k, v in renames(rest).items()}, **heads}

    return load_weights(CrossEncoder(encoder, head, types), path, sanitize), positions


def _yes_no(path: Path, cfg: dict[str, Any], info: RerankInfo, tokenizer: EmbedTokenizer) -> nn.Module:
    """mlx_lm's model for the checkpoint, head included (weights evaluated by the caller)."""
    from mlx_lm.utils import load_model  # deferred: importing mlx_lm pulls in transformers

    assert info.prompt is not None
    lm, _ = load_model(path, lazy=True, strict=True)
    if not callable(getattr(lm, "model", None)):
        raise ValueError(f"the {info.architecture} model has no `.model` body to take hidden states from")
    answers = []
    for word in (info.prompt.yes, info.prompt.no):
        token = tokenizer.tokenizer.token_to_id(word)
        if token is None:
            raise ValueError(f"the tokenizer has no {word!r} token, which a yes/no reranker answers with")
        answers.append(token)
    return YesNoDecoder(lm, answers[0], answers[1])


def load_reranker(path: Path, info: RerankInfo, dtype: Optional[mx.Dtype] = None) -> Reranker:
    """Load the reranker in `path`; raises ValueError for one this server cannot run."""
    cfg = json.loads((path / "config.json").read_text())
    if info.head == "yes-no":
        tokenizer = EmbedTokenizer.from_dir(path, info.max_length)
        model = _yes_no(path, cfg, info, tokenizer)
    else:
        model, positions = _cross_encoder(path, cfg, info)
        tokenizer = EmbedTokenizer.from_dir(path, min(info.max_length, positions))
    if dtype is not None:
        model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return Reranker(model, tokenizer, info, path)


__all__ = ["CrossEncoder", "ModernBertHead", "Reranker", "TanhHead", "YesNoDecoder", "load_reranker"]
