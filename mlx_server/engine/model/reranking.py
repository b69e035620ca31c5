"""Reranking on one loaded reranker (its `rerank` worker): the embedding engine's packed passes, over pairs.

A rerank request is embedding-shaped work: one input per (query, document) pair, each scored alone by one forward
pass row. So it runs on `PackedBatcher` (engine/model/embedding.py) unchanged: pairs of similar length, this
request's and other waiting rerank requests' for the same model, packed into padded masked passes, scheduled in
prefill slices between decode steps, with the same activation reservation, cancellation and timeouts. Only the
pass (`Reranker.score`, which also needs where each pair's document starts) and the result (Scores) differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from mlx_server.contract.events import Event, Scores, Sink
from mlx_server.engine.model.embedding import EmbedWork, PackedBatcher, shortest_first
from mlx_server.engine.prepare.rerank import PreparedRerank

# Pairs as token ids, and where each one's document starts → (pairs,) relevance in [0, 1], evaluated.
Score = Callable[[Sequence[Sequence[int]], Sequence[int]], mx.array]


@dataclass
class RerankWork(EmbedWork):
    """One RerankRequest's pairs and the scores made so far."""

    firsts: list[int] = field(default_factory=list)  # per pair: the index its document segment starts at


class RerankBatcher(PackedBatcher[RerankWork]):
    """The rerank requests of one model. Implements engine.loop.jobs.Worker for `PreparedRerank` requests."""

    what = "reranking"

    def __init__(self, name: str, score: Score, per_token: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, 1, per_token, clock)
        self.score: Optional[Score] = score

    def add(self, prepared: PreparedRerank, sink: Sink, load_duration: float = 0.0) -> None:
        self.start(
            RerankWork(
                prepared.request,
                sink,
                prepared.inputs,
                None,
                self.clock(),
                load_duration,
                shortest_first(prepared.inputs),
                vectors=[None] * len(prepared.inputs),
                normalize=False,
                firsts=prepared.firsts,
            )
        )

    def forward_rows(self, picked: list[tuple[RerankWork, int]]) -> np.ndarray:
        assert self.score is not None, "closed"
        scores = self.score([j.inputs[i] for j, i in picked], [j.firsts[i] for j, i in picked])
        return np.array(scores, dtype=np.float32).reshape(len(picked), 1)

    def release(self) -> None:
        self.score = None

    def result(self, job: RerankWork) -> Event:
        return Scores(job.request_id, self.name, self.rows(job)[:, 0].astype(np.float32), job.size)


__all__ = ["RerankBatcher", "RerankWork", "Score"]
