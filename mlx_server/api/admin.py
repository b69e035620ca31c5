"""Health and metrics: answered straight from snapshots, never queued behind the engine or rate-limited."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_server.api.context import ctx_of
from mlx_server.contract.status import WorldStatus

GB = 1e9


def health_body(request: Request) -> tuple[dict[str, Any], int]:
    ctx = ctx_of(request)
    status = ctx.engine.status()
    counters, snapshot, memory = status.counters, status.models, status.memory
    mem = psutil.virtual_memory()
    resident = memory.weights
    budget = memory.budget
    warnings: list[str] = []
    if mem.percent >= 90:
        warnings.append(f"system memory {mem.percent:.0f}% used")
    if budget and memory.used > 0.9 * budget:
        warnings.append(f"weights, KV and prompt caches use {memory.used / budget:.0%} of the memory budget")
    if counters.queue_size >= ctx.config.server.max_queue:
        warnings.append("request queue is full")
    now = time.monotonic()
    alive = status.alive
    if not alive:
        warnings.append(f"inference engine is not running: {status.fatal or 'stopped'}")
    body = {
        "status": "healthy" if alive else "unhealthy",
        "active_requests": counters.active_requests,
        "max_concurrent": ctx.config.server.max_concurrent,
        "queue_size": counters.queue_size,
        "models_cached": sum(1 for r in snapshot if not r.is_loading),
        "total_models": len(ctx.config.models),
        "cached_models": [
            {
                "name": r.name,
                "use_count": r.use_count,
                "last_used": time.time() - (now - r.last_used) if r.last_used else None,
                "load_time_seconds": round(r.load_seconds, 3),
                "active_requests": r.active,
                "is_loading": r.is_loading,
                "kv_cache": r.kv_cache,
                "kv_bytes_per_token": r.kv_bytes_per_token,
                "draft": r.draft or None,
            }
            for r in snapshot
        ],
        "memory": {
            "used_percent": mem.percent,
            "available_gb": round(mem.available / GB, 3),
            "total_gb": round(mem.total / GB, 3),
            "budget_gb": round(budget / GB, 3),
            "resident_gb": round(resident / GB, 3),
            "kv_reserved_gb": round(memory.kv_reserved / GB, 3),
            "prompt_cache_gb": round(memory.prompt_cache / GB, 3),
            "mlx_active_gb": round(memory.mlx_active / GB, 3),
            "mlx_peak_gb": round(memory.mlx_peak / GB, 3),
        },
        "prefill_queue_tokens": status.prefill_queue_tokens,
        "prefill": [
            {"model": p.model, "request_id": p.request_id, "prefilled": p.prefilled, "total": p.total}
            for p in status.prefill
        ],
        "uptime_seconds": round(time.time() - ctx.started, 1),
        **({"distributed": world_body(status.world, now)} if status.world else {}),
        "warnings": warnings,
    }
    return body, (200 if alive else 503)


def world_body(world: WorldStatus, now: float) -> dict[str, Any]:
    """The group rank 0 leads: every rank's last report (a step plan it took part in; idle, one a second)."""
    return {
        "backend": world.backend,
        "world_size": world.size,
        "rank": world.rank,
        "broken": world.broken,
        "ranks": [
            {
                "rank": r.rank,
                "pid": r.pid,
                "alive": world.broken is None and now - r.last_seen < 5.0,
                "last_seen_seconds_ago": round(now - r.last_seen, 3),
                "free_gb": round(r.free_bytes / GB, 3),
            }
            for r in world.ranks
        ],
        "step_plans": world.plans,
        "last_plan_bytes": world.last_plan_bytes,
        "largest_plan_bytes": world.largest_plan_bytes,
        "mean_plan_bytes": round(world.plan_bytes / world.plans, 1) if world.plans else 0,
        "exchange_ms_mean": round(1000 * world.exchange_seconds / world.plans, 3) if world.plans else 0,
    }


async def health(request: Request) -> Response:
    body, status = health_body(request)
    problems = await model_problems(request)
    body["model_problems"] = problems
    if problems:
        body["warnings"].append(
            f"{len(problems)} configured model(s) cannot be served now: "
            f"{', '.join(sorted(problems))} (see model_problems)"
        )
    return JSONResponse(body, status_code=status)


async def model_problems(request: Request) -> dict[str, list[dict[str, Any]]]:
    """Why each configured model that cannot be served right now can't: missing weights, over the budget, or its
    last load failed. Stat calls, cached, in a thread (never on the event loop), and bounded: /health stays instant."""
    ctx = ctx_of(request)
    if ctx.problems is None:
        return {}
    failed = dict(ctx.engine.status().load_errors)
    try:
        found = await asyncio.wait_for(asyncio.to_thread(ctx.problems.as_json, failed), timeout=0.25)
    except asyncio.TimeoutError:
        return {name: [{"reason": "load_failed", "message": error}] for name, error in failed.items()}
    # Where the server looked on disk stays out of an unauthenticated endpoint; `mlx-server doctor` shows it.
    return {name: [{k: v for k, v in p.items() if k != "looked"} for p in problems] for name, problems in found.items()}


async def queue_stats(request: Request) -> Response:
    ctx = ctx_of(request)
    c = ctx.engine.status().counters
    high, medium, low = c.by_priority
    return JSONResponse(
        {
            "active_requests": c.active_requests,
            "max_concurrent": ctx.config.server.max_concurrent,
            "queue_size": c.queue_size,
            "stats": {
                "total_queued": c.total_queued,
                "total_processed": c.total_processed,
                "by_priority": {"HIGH": high, "MEDIUM": medium, "LOW": low},
            },
        }
    )


async def metrics(request: Request) -> Response:
    return Response(ctx_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
