"""Reranking: each (query, document) pair tokenized and fitted off the thread (engine/prepare/rerank.py), then
scored on the inference thread in the embedding engine's packed, length-bucketed passes, scheduled like prompt
prefill (engine/model/reranking.py). Rerankers are loaded, budgeted, kept and evicted as embedding models are
(their files say which they are: models/rerankinfo.py); any other model refuses with a 400."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import RerankRequest
from mlx_server.engine.kinds.base import Kind
from mlx_server.engine.loop.budget import ACTIVATION_FACTOR, kv_bound
from mlx_server.engine.loop.jobs import Admitting, Outcome, Worker
from mlx_server.engine.model.embedders.rerankers import Reranker
from mlx_server.engine.model.loader import Weights
from mlx_server.engine.model.reranking import RerankBatcher
from mlx_server.engine.prepare.rerank import PreparedRerank, prepare_rerank
from mlx_server.engine.prepare.stage import Preparer

NAME = "rerank"


@dataclass(frozen=True)
class RerankJob(PreparedRerank):
    reserve: int = 0  # activations to reserve beside the weights when its model must be loaded first

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        unsupported = BadRequest(f'"{self.request.model}" does not support rerank')
        return loop.run_on_model(self, NAME, unsupported, self.reserve, load_seconds, self.request.keep_alive)

    def wire(self) -> RerankJob:
        return self

    def for_rank(self, preparer: Preparer) -> RerankJob:
        return self


def prepare(preparer: Preparer, request: RerankRequest) -> RerankJob:
    files = preparer.files(request.model)
    prepared = prepare_rerank(files, request)  # a model that cannot rerank is refused here, never loaded
    return RerankJob(
        **{f.name: getattr(prepared, f.name) for f in fields(prepared)},
        reserve=kv_bound([prepared.kv_tokens], files.kv_per_token),
    )


def worker(weights: Weights, built: Mapping[str, Worker]) -> Optional[RerankBatcher]:
    reranker = weights.embedder
    if not isinstance(reranker, Reranker):
        return None
    return RerankBatcher(
        weights.name, reranker.score, weights.kv_per_token or ACTIVATION_FACTOR * 4 * reranker.dimensions
    )


KIND = Kind(NAME, (RerankRequest,), prepare, worker=worker)

__all__ = ["KIND", "RerankJob"]
