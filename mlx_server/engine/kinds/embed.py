"""Embedding: inputs tokenized and fitted off the thread, then embedded in packed forward passes scheduled like
prompt prefill (engine/model/embedding.py). Embedding models embed with their encoder; generation models embed
too, as Ollama's do, with their mean-pooled final hidden states."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import EmbedRequest
from mlx_server.engine.kinds.base import Kind
from mlx_server.engine.loop.budget import ACTIVATION_FACTOR, kv_bound
from mlx_server.engine.loop.jobs import Admitting, Outcome, Worker
from mlx_server.engine.model.embedders.rerankers import Reranker
from mlx_server.engine.model.embedding import EmbedBatcher, decoder_forward
from mlx_server.engine.model.loader import Weights
from mlx_server.engine.prepare.stage import PreparedEmbed, Preparer

NAME = "embed"


@dataclass(frozen=True)
class EmbedJob(PreparedEmbed):
    reserve: int = 0  # activations to reserve beside the weights when its model must be loaded first

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        unsupported = BadRequest(f'"{self.request.model}" does not support embeddings')
        return loop.run_on_model(self, NAME, unsupported, self.reserve, load_seconds, self.request.keep_alive)

    def wire(self) -> EmbedJob:
        return self

    def for_rank(self, preparer: Preparer) -> EmbedJob:
        return self


def prepare(preparer: Preparer, request: EmbedRequest) -> EmbedJob:
    files = preparer.files(request.model)
    if files.rerank is not None:  # refused here, before its model would be loaded only to have no embed worker
        raise BadRequest(f'"{request.model}" does not support embeddings')
    prepared = preparer.prepare_embed(request)
    return EmbedJob(
        **{f.name: getattr(prepared, f.name) for f in fields(prepared)},
        reserve=kv_bound([prepared.kv_tokens], files.kv_per_token),
    )


def worker(weights: Weights, built: Mapping[str, Worker]) -> Optional[EmbedBatcher]:
    embedder = weights.embedder
    if isinstance(embedder, Reranker):
        return None  # it scores pairs: its hidden states were never trained to be sentence vectors
    if embedder is not None:
        width = embedder.dimensions
        return EmbedBatcher(
            weights.name,
            lambda batch: embedder.embed(batch, normalize=False),
            width,
            weights.kv_per_token or ACTIVATION_FACTOR * 4 * width,
        )
    forward = decoder_forward(weights.model)
    width = int(getattr(getattr(weights.model, "args", None), "hidden_size", 0) or 0)
    if forward is None or not width:
        return None
    return EmbedBatcher(weights.name, forward, width, ACTIVATION_FACTOR * 4 * width)


KIND = Kind(NAME, (EmbedRequest,), prepare, worker=worker)

__all__ = ["EmbedJob", "KIND"]
