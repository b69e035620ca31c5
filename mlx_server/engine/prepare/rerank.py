"""Preparing a rerank request, off the inference thread: every (query, document) pair tokenized as its model reads
it and fitted to the context, cutting the document only.

- A cross-encoder reads the pair through its tokenizer's pair template (`[CLS] query [SEP] document [SEP]`,
  `<s> query </s></s> document </s>`), token types from the template. The query and the documents are encoded
  once each, without special tokens; a document longer than the room the query leaves is cut from its end, and the
  template adds the specials after (transformers' `truncation="only_second"`: sentence-transformers' default
  `longest_first` would cut a long query too).
- A decoder reranker reads its fixed prompt (models.rerankinfo.DecoderPrompt) around one body per document,
  "<Instruct>: … <Query>: … <Document>: …", cut from its end (the document's) as the Qwen3-Reranker reference cuts
  it, with its prefix and suffix kept whole. A query whose part of the prompt leaves no room for the document is a
  400 rather than a cut query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import RerankRequest
from mlx_server.engine.loop.budget import pass_tokens
from mlx_server.engine.prepare.embed_tokenizer import EmbedTokenizer
from mlx_server.engine.prepare.stage import ModelFiles
from mlx_server.models.rerankinfo import DecoderPrompt


@dataclass(frozen=True)
class PreparedRerank:
    """A rerank request ready to admit: one input per document, the pair as its model reads it."""

    request: RerankRequest
    inputs: list[list[int]]
    firsts: list[int]  # per pair: where its document's token type (1) starts; its length when it has one segment

    @property
    def kv_tokens(self) -> int:
        """Tokens in the largest forward pass it can make (what its activations take, for the budget)."""
        return pass_tokens(sum(len(ids) for ids in self.inputs), max((len(ids) for ids in self.inputs), default=0))


def _too_long(query: int, limit: int) -> BadRequest:
    return BadRequest(
        f"the query takes {query} tokens: with the prompt around it, it leaves no room for a document in the "
        f"context length ({limit})"
    )


def _pairs(tokenizer: Any, req: RerankRequest, limit: int) -> tuple[list[list[int]], list[int]]:
    query = tokenizer.encode(req.query, add_special_tokens=False)
    room = limit - tokenizer.num_special_tokens_to_add(is_pair=True) - len(query.ids)
    if room < 1:
        raise _too_long(len(query.ids), limit)
    inputs: list[list[int]] = []
    firsts: list[int] = []
    for document in tokenizer.encode_batch(list(req.documents), add_special_tokens=False):
        if len(document.ids) > room:
            document.truncate(room)  # its end goes; the template's closing [SEP] / </s> is added after
        pair = tokenizer.post_process(query, document)
        types = list(pair.type_ids)
        inputs.append(list(pair.ids))
        firsts.append(next((i for i, t in enumerate(types) if t), len(types)))
    return inputs, firsts


def _prompted(
    tokenizer: Any, prompt: DecoderPrompt, req: RerankRequest, limit: int
) -> tuple[list[list[int]], list[int]]:
    prefix = list(tokenizer.encode(prompt.prefix, add_special_tokens=False).ids)
    suffix = list(tokenizer.encode(prompt.suffix, add_special_tokens=False).ids)
    room = limit - len(prefix) - len(suffix) - tokenizer.num_special_tokens_to_add(is_pair=False)
    # The body up to the document alone; within a token of its share of the whole body (a word may merge across).
    head = len(tokenizer.encode(prompt.head(req.query, req.instruction), add_special_tokens=False).ids)
    if head >= room:
        raise _too_long(head, limit)
    instruction = req.instruction or prompt.instruction
    bodies = [prompt.body.format(instruction=instruction, query=req.query, document=d) for d in req.documents]
    inputs: list[list[int]] = []
    for body in tokenizer.encode_batch(bodies, add_special_tokens=False):
        if len(body.ids) > room:
            body.truncate(room)
        inputs.append(prefix + list(tokenizer.post_process(body).ids) + suffix)
    return inputs, [len(ids) for ids in inputs]


def prepare_rerank(files: ModelFiles, req: RerankRequest) -> PreparedRerank:
    """Tokenize and fit every pair: raises BadRequest for a model that cannot rerank or a query that cannot fit."""
    info = files.rerank
    if info is None or not isinstance(files.tokenizer, EmbedTokenizer):
        raise BadRequest(f'"{req.model}" does not support rerank')
    limit = min(req.num_ctx, files.context_length) if req.num_ctx else files.context_length
    tokenizer = files.tokenizer.tokenizer
    if info.prompt is None:
        inputs, firsts = _pairs(tokenizer, req, limit)
    else:
        inputs, firsts = _prompted(tokenizer, info.prompt, req, limit)
    return PreparedRerank(req, inputs, firsts)


__all__ = ["PreparedRerank", "prepare_rerank"]
