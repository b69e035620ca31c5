"""Memory facts and policy for the inference thread: what the OS has free, MLX's limits on Metal, and how stored
prompt caches give way to the budget. Everything here runs on the inference thread."""

from __future__ import annotations

import logging

import mlx.core as mx

from mlx_server.engine.model.loader import LoadedModel
from mlx_server.engine.loop.pool import ModelPool

log = logging.getLogger("mlx_server.engine")


def trim_stored_caches(pool: ModelPool[LoadedModel], cap: int, free: int) -> None:
    """Hold stored prompt caches to `cap` and to what the budget leaves, and free `free` bytes more.

    Least recently used models give first."""
    runners = [entry.model.runner for entry in pool.residents()]
    stored = sum(r.stored_cache_bytes for r in runners)
    room = pool.budget - (pool.used_bytes() - stored)
    over = max(stored - min(cap, room), free)
    for runner in runners:
        if over <= 0:
            return
        before = runner.stored_cache_bytes
        runner.trim_prompt_cache(before - over)
        over -= before - runner.stored_cache_bytes


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def limit_metal_memory(budget: int) -> None:
    """On Metal, make an overrun of the budget an allocation error rather than a process abort."""
    try:
        if not mx.metal.is_available():
            return
        mx.set_memory_limit(budget)
        mx.set_wired_limit(min(budget, int(mx.metal.device_info().get("max_recommended_working_set_size", budget))))
    except Exception as exc:  # noqa: BLE001 - older macOS has no wired limit; the budget still holds
        log.warning("could not set MLX memory limits: %s", exc)
