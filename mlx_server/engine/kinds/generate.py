"""Generation: a prompt tokenized, fitted and its grammar compiled off the thread (engine/prepare/), then
prefilled in slices and decoded in its model's continuous batch (engine/model/runner.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping, Optional

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.kinds.base import Kind
from mlx_server.engine.loop.budget import kv_bound
from mlx_server.engine.loop.jobs import Admitting, Outcome, Worker
from mlx_server.engine.model.loader import Weights
from mlx_server.engine.model.runner import GenerateWorker
from mlx_server.engine.model.speculative import PairedModel
from mlx_server.engine.prepare.stage import Prepared, Preparer

NAME = "generate"


@dataclass(frozen=True)
class GenerateJob(Prepared):
    reserve: int = 0  # KV to reserve beside the weights when its model must be loaded first (from config.json)

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        unsupported = BadRequest(f'"{self.request.model}" does not support generate')
        return loop.run_on_model(self, NAME, unsupported, self.reserve, load_seconds, self.request.keep_alive)

    def wire(self) -> GenerateJob:
        return replace(self, grammar=[])  # logits processors hold per-rank state: each rank compiles its own

    def for_rank(self, preparer: Preparer) -> GenerateJob:
        return preparer.with_grammar(self)


def prepare(preparer: Preparer, request: GenerateRequest) -> GenerateJob:
    prepared = preparer.prepare(request)
    files = preparer.files(request.model)
    return GenerateJob(
        **{f.name: getattr(prepared, f.name) for f in fields(prepared)},
        reserve=kv_bound([prepared.kv_tokens], files.kv_per_token),
    )


def worker(weights: Weights, built: Mapping[str, Worker]) -> Optional[GenerateWorker]:
    if weights.model is None:
        return None
    model = weights.model if weights.draft_model is None else PairedModel(weights.model, weights.draft_model)
    return GenerateWorker(
        weights.name,
        model,
        weights.files.tokenizer,
        weights.context_length,
        kv_per_token=weights.kv_per_token,
        max_batch=weights.max_batch,
        prompt_cache_bytes=weights.prompt_cache_bytes,
        kv=weights.kv_cache,
        draft=weights.drafting,
    )


KIND = Kind(NAME, (GenerateRequest,), prepare, worker=worker)

__all__ = ["GenerateJob", "KIND"]
