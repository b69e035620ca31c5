"""What the inference thread publishes about resident models, prefill progress and memory.

Kept apart from core.py so the thread's loop stays readable; everything here runs on the inference thread.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from mlx_server.contract.status import (
    EngineCounters,
    EngineStatus,
    MemoryStatus,
    ModelStatus,
    PrefillProgress,
    WorldStatus,
)
from mlx_server.engine.loop.jobs import Model
from mlx_server.engine.loop.pool import ModelPool


def resident_status(pool: ModelPool[Model]) -> tuple[list[ModelStatus], MemoryStatus]:
    """Each resident (and loading) model, and what holds the memory budget."""
    models = []
    for r in pool.residents():
        model = r.model
        models.append(
            ModelStatus(
                name=r.name,
                size=r.size,
                context_length=model.context_length,
                loaded_at=r.loaded_at,
                load_seconds=r.load_seconds,
                last_used=r.last_used,
                expires_at=r.expires_at,
                active=r.active,
                use_count=r.use_count,
                kv_reserved=model.reserved,
                prompt_cache=model.stored,
                shards=model.shards,
                split=model.split,
                kv_cache=model.kv_cache,
                kv_bytes_per_token=model.kv_per_token,
                draft=model.draft,
            )
        )
    if pool.loading is not None:
        models.append(
            ModelStatus(
                name=pool.loading,
                size=pool.loading_size,
                context_length=0,
                loaded_at=0.0,
                load_seconds=0.0,
                last_used=0.0,
                expires_at=None,
                active=0,
                use_count=0,
                is_loading=True,
            )
        )
    memory = MemoryStatus(
        budget=pool.budget.limit,
        weights=pool.resident_bytes() + pool.loading_size,
        kv_reserved=sum(m.kv_reserved for m in models),
        prompt_cache=sum(m.prompt_cache for m in models),
        mlx_active=mx.get_active_memory(),
        mlx_peak=mx.get_peak_memory(),
        mlx_cache=mx.get_cache_memory(),
    )
    return models, memory


def prefill_status(pool: ModelPool[Model]) -> tuple[PrefillProgress, ...]:
    return tuple(
        PrefillProgress(job.request_id, job.model, job.done, job.size, job.priority)
        for r in pool.residents()
        for job in r.model.prefill_jobs()
    )


def engine_status(
    pool: ModelPool[Model], counters: EngineCounters, fatal: Optional[str], closed: bool, world: Optional[WorldStatus]
) -> EngineStatus:
    """The one frozen snapshot handlers read, replaced after every loop iteration and every request's end."""
    models, memory = resident_status(pool)
    return EngineStatus(
        alive=fatal is None and not closed,
        fatal=fatal,
        counters=counters,
        world=world,
        models=tuple(models),
        pool=pool.stats,
        memory=memory,
        prefill=prefill_status(pool),
    )
