"""`mlx-server preload`: make configured models present on disk, then warm the running server with them.

Warming is a load-only request (`POST /api/generate` with no prompt), sent in priority order while the models
warmed so far fit the server's memory budget and model count: the pool evicts idle models to make room, so
loading past the budget would only push out the models warmed first. The run ends with a table and exits
non-zero if any model failed (missing, not loadable, refused, evicted); skipped models are not failures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TextIO

from mlx_server.config.load import Config, ModelConfig
from mlx_server.models.sources import Located, locate
from mlx_server.ops.client import ClientError, error_text, format_table, get_json, http_client, human_size
from mlx_server.ops.pull import ensure_local


@dataclass
class Row:
    name: str
    on_disk: str = "-"
    size: int = 0  # what loading it will take (weights + KV reserve)
    load_seconds: Optional[float] = None
    resident: Optional[int] = None
    status: str = ""
    failed: bool = False

    def cells(self) -> list[str]:
        return [
            self.name,
            self.on_disk,
            "-" if self.load_seconds is None else f"{self.load_seconds:.2f}",
            "-" if self.resident is None else human_size(self.resident),
            self.status,
        ]


def select(config: Config, names: Sequence[str], preload_only: bool) -> tuple[list[ModelConfig], list[Row]]:
    """The models to preload in warm order (priority, then config order), and rows for unknown names."""
    order = {name: i for i, name in enumerate(config.models)}
    unknown: list[Row] = []
    chosen: dict[str, ModelConfig] = {}
    for requested in names:
        name = config.resolve(requested)
        if name is None:
            unknown.append(Row(requested, status=f"failed: not configured in {config.path}", failed=True))
        else:
            chosen[name] = config.models[name]
    if not names:
        chosen = dict(config.models)
    if preload_only:
        chosen = {k: m for k, m in chosen.items() if m.preload}
    return sorted(chosen.values(), key=lambda m: (m.priority, order[m.name])), unknown


def footprint(model: ModelConfig, located: Located) -> int:
    """Bytes the server will take to load `model`: its weights, the same rule as the engine's load estimate
    (KV is reserved per request when requests arrive, not per model), so preload stops before the pool would
    have to evict a model it warmed earlier."""
    return located.size


def ensure_on_disk(
    model: ModelConfig, config_dir: Optional[Path], row: Row, err: TextIO, cache_dir: Optional[Path] = None
) -> None:
    print(f"{model.name}: checking {model.source}", file=err, flush=True)
    result = ensure_local(model, config_dir, update=False, cache_dir=cache_dir)  # hub progress bars go to stderr
    if not result.ok:
        row.on_disk, row.status, row.failed = "missing", f"failed: {result.error}", True
        return
    row.on_disk = human_size(result.size)
    row.size = footprint(model, locate(model, config_dir, cache_dir))
    row.status = "downloaded" if result.downloaded else "on disk"


def warm(
    config: Config, models: Sequence[ModelConfig], rows: dict[str, Row], url: str, key: Optional[str], err: TextIO
) -> None:
    with http_client(url, key, timeout=None) as client:
        try:
            health = get_json(client, "/health")
            resident = {m["name"]: int(m.get("size", 0)) for m in get_json(client, "/api/ps")["models"]}
        except ClientError as exc:
            for row in rows.values():
                if not row.failed:
                    row.status, row.failed = f"{row.status}; not warmed: {exc}", True
            return
        budget = int(float(health.get("memory", {}).get("budget_gb") or 0) * 1e9) or config.server.memory_budget
        if abs(budget - config.server.memory_budget) <= 1e6:  # /health rounds to MB: same server config
            budget = config.server.memory_budget
        warmed: dict[str, int] = {}
        for model in models:
            row = rows[model.name]
            if row.failed:
                continue
            if model.keep_alive == 0:
                row.status = f"{row.status}; not warmed: keep_alive is 0"
                continue
            already = model.name in resident
            need = resident.get(model.name) or row.size
            if not already and len(warmed) >= config.server.max_loaded_models:
                row.status = f"skipped: max_loaded_models ({config.server.max_loaded_models}) reached"
                continue
            if not already and sum(warmed.values()) + need > budget:
                row.status = (
                    f"skipped: over the memory budget ({human_size(sum(warmed.values()) + need)} > "
                    f"{human_size(budget)})"
                )
                continue
            print(f"{model.name}: loading", file=err, flush=True)
            body: dict[str, object] = {"model": model.name}
            if model.keep_alive is not None:
                body["keep_alive"] = model.keep_alive
            started = time.perf_counter()
            try:
                response = client.post("/api/generate", json=body)
            except Exception as exc:  # noqa: BLE001 - any transport failure is this model's row, not a crash
                row.status, row.failed = f"load failed: {exc}", True
                continue
            if response.status_code >= 400:
                verb = "refused" if response.status_code == 503 else "load failed"
                row.status, row.failed = f"{verb}: {error_text(response)}", True
                continue
            load_ns = response.json().get("load_duration")
            row.load_seconds = load_ns / 1e9 if isinstance(load_ns, int) else time.perf_counter() - started
            now = {m["name"]: int(m.get("size", 0)) for m in get_json(client, "/api/ps")["models"]}
            row.resident = now.get(model.name)
            row.status = "already loaded" if already else "loaded"
            warmed[model.name] = row.resident or need
        still = {m["name"] for m in get_json(client, "/api/ps")["models"]}
        for name in warmed:
            if name not in still:
                rows[name].status, rows[name].failed, rows[name].resident = "evicted by a later load", True, None


def preload(
    config: Config,
    names: Sequence[str],
    *,
    preload_only: bool,
    url: str,
    key: Optional[str],
    do_warm: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    models, unknown = select(config, names, preload_only)
    if not models and not unknown:
        print("nothing to preload" + (" (no model has preload: true)" if preload_only else ""), file=err)
        return 0
    config_dir = config.path.parent if config.path else None
    rows = {m.name: Row(m.name) for m in models}
    for model in models:
        ensure_on_disk(model, config_dir, rows[model.name], err, config.server.cache_dir)
    if do_warm:
        warm(config, models, rows, url, key, err)
    table = [r.cells() for r in [*rows.values(), *unknown]]
    print(format_table(["MODEL", "ON DISK", "LOAD S", "RESIDENT", "STATUS"], table), file=out)
    return 1 if any(r.failed for r in [*rows.values(), *unknown]) else 0
