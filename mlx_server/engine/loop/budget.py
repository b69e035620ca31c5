"""All memory accounting of the inference thread, in one place: what a sequence's KV and a forward pass's activations
may take, what the budget covers and how room is made in it, how stored prompt caches give way, what the OS has
free, and MLX's own limits on Metal.

The budget covers weights (a running load's too), what workers reserve for admitted work (KV, activations) and
what they store for later requests (prompt caches). Memory is checked before it is used: a request that does not
fit waits until running work ends; one that can never fit is refused with the numbers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

import mlx.core as mx

from mlx_server.contract.errors import InsufficientMemory

if TYPE_CHECKING:
    from mlx_server.engine.loop.pool import ModelPool

log = logging.getLogger("mlx_server.engine")

KV_STEP = 256  # mlx_lm's KVCache grows its buffers in steps of this many tokens
EMBED_BATCH_TOKENS = 8192  # most (padded) tokens in one embedding forward pass, unless one input is longer
ACTIVATION_FACTOR = 8  # float32 hidden-width buffers alive per token in a forward pass (hidden, MLP, q/k/v)


def kv_bound(lengths: list[int], kv_per_token: int) -> int:
    """The most memory the KV of a batch of sequences that may grow to `lengths` tokens can take.

    BatchGenerator keeps one cache per batch, every row padded to the longest and grown in steps of KV_STEP
    tokens: rows × the longest rounded up, not the sum of the lengths. Growing, joining and leaving the batch
    copy that cache (old and new buffers live at once), so the peak is twice that (measured: MLX's peak
    exceeded weights + KV by one whole batch cache). Also used before a model is loaded, from config.json.
    """
    if not lengths:
        return 0
    longest = -(-max(lengths) // KV_STEP) * KV_STEP
    return 2 * len(lengths) * longest * kv_per_token


def pass_tokens(total: int, longest: int) -> int:
    """Tokens in the largest embedding forward pass that inputs of `total` tokens (the longest `longest`) make."""
    return min(total, max(EMBED_BATCH_TOKENS, longest))


def activation_bound(total: int, longest: int, per_token: int) -> int:
    """Activation memory of the largest forward pass over inputs of `total` tokens, the longest `longest`."""
    return pass_tokens(total, longest) * per_token


class Budget:
    """The byte budget and the model count, and the rule for making room: stored prompt caches give way first,
    then idle models, least recently used first — but only when evicting them is enough, so a request that must
    wait anyway never costs anyone their model."""

    def __init__(
        self,
        limit: int,
        max_models: int,
        *,
        held: Callable[[Any], int] = lambda m: 0,
        trim: Callable[[int], None] = lambda n: None,
        available: Optional[Callable[[], int]] = None,
    ) -> None:
        self.limit = limit
        self.max_models = max_models
        self.held = held  # bytes a resident holds beyond its weights (reserved KV, stored prompt caches)
        self._trim = trim  # give up this many bytes of stored prompt caches, least recently used first
        self._available = available  # free memory of the machine (distributed: of the tightest rank)

    def used(self, pool: ModelPool[Any]) -> int:
        """Everything the budget covers: weights (a running load's too), reserved KV, stored prompt caches."""
        return pool.resident_bytes() + pool.loading_size + sum(self.held(r.model) for r in pool.residents())

    def make_room(self, pool: ModelPool[Any], need: int, keep: Optional[str] = None, extra_model: bool = False) -> bool:
        """Free memory for `need` more bytes (and one more model when `extra_model`); False if not possible now."""

        def fits(used: int, count: int) -> bool:
            return used + need <= self.limit and (not extra_model or count < self.max_models)

        count = len(pool.residents()) + (1 if pool.loading else 0)
        if fits(self.used(pool), count):
            return True
        self._trim(self.used(pool) + need - self.limit)
        used = self.used(pool)
        if fits(used, count):
            return True
        victims = []
        for r in pool.residents():
            if fits(used, count):
                break
            if r.active == 0 and r.name != keep:
                victims.append(r.name)
                used -= r.size + self.held(r.model)
                count -= 1
        if not fits(used, count):
            return False
        for name in victims:
            log.info("evicting %s (least recently used, idle) to make room", name)
            pool.evict(name)
        return True

    def check_load(self, name: str, weights: int, reserve: int) -> None:
        """Refuse a model that can never fit: its weights and its first request's reservation over the budget."""
        if weights + reserve > self.limit:
            raise InsufficientMemory(
                f'model "{name}" needs {(weights + reserve) / 1e9:.2f} GB (weights {weights / 1e9:.2f} GB + KV '
                f"{reserve / 1e9:.2f} GB for this request), more than the memory budget of {self.limit / 1e9:.2f} GB"
            )

    def check_available(self, name: str, weights: int) -> None:
        if self._available is not None:
            free = self._available()
            if weights > free:
                raise InsufficientMemory(
                    f'model "{name}" needs {weights / 1e9:.2f} GB but only {free / 1e9:.2f} GB of memory is '
                    f"available (budget {self.limit / 1e9:.2f} GB)"
                )

    def check_alone(self, name: str, weights: int, footprint: int, tokens: int) -> None:
        """Refuse a request that could not run even alone beside its model's weights."""
        if weights + footprint > self.limit:
            raise InsufficientMemory(
                f'model "{name}" needs {(weights + footprint) / 1e9:.2f} GB for this request (weights '
                f"{weights / 1e9:.2f} GB + KV for {tokens} tokens), more than the memory budget of "
                f"{self.limit / 1e9:.2f} GB"
            )


def trim_stored_caches(pool: ModelPool[Any], budget: Budget, cap: int, free: int) -> None:
    """Hold stored prompt caches to `cap` and to what the budget leaves, and free `free` bytes more.

    Least recently used models give first."""
    workers = [w for entry in pool.residents() for w in entry.model.workers.values()]
    stored = sum(w.stored for w in workers)
    room = budget.limit - (budget.used(pool) - stored)
    over = max(stored - min(cap, room), free)
    for worker in workers:
        if over <= 0:
            return
        before = worker.stored
        if before:
            worker.trim(before - over)
            over -= before - worker.stored


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


__all__ = [
    "ACTIVATION_FACTOR",
    "Budget",
    "EMBED_BATCH_TOKENS",
    "KV_STEP",
    "activation_bound",
    "available_memory",
    "kv_bound",
    "limit_metal_memory",
    "pass_tokens",
    "trim_stored_caches",
]
