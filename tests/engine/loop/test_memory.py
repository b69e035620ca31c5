"""The memory budget bounds weights + the KV of every admitted sequence + stored prompt caches, for real:
a server process whose budget cannot hold the KV of all its requests runs them all, in turns, and MLX's own
peak memory (as /metrics reports it) never passes the budget."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest

from support.serving import start_process
from support.tinymodels import build_tiny_model

BUDGET = 16_000_000
N, TOKENS = 12, 1500


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


@pytest.mark.timeout(240)
def test_twelve_long_generations_fit_a_budget_too_small_for_all_their_kv(tmp_path: Path) -> None:
    # float32, 2 layers × 4 KV heads × 32 dims: 1 KiB of KV per token, so 12 × 1,500 tokens hold 18 MB of KV
    model = build_tiny_model(tmp_path / "kv", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, seed=5)
    kv_per_token = 2 * 2 * 4 * 32 * 4
    assert N * TOKENS * kv_per_token > BUDGET
    proc, url = start_process(tmp_path, {"kv": {"source": str(model)}}, memory_budget=BUDGET,
                              prompt_cache_bytes=0, max_concurrent=16)
    try:
        results: list[dict] = []
        seen_waiting, seen_over = [], []
        done = threading.Event()

        def one(i: int) -> None:
            r = httpx.post(f"{url}/api/generate", timeout=200, json={
                "model": "kv", "prompt": f"request {i}", "raw": True, "stream": False,
                "options": {"num_predict": TOKENS, "temperature": 0}})
            results.append(r.json())

        def watch() -> None:
            while not done.is_set():
                text = httpx.get(f"{url}/metrics", timeout=5).text
                seen_waiting.append(metric(text, "mlx_queue_depth"))
                seen_over.append(metric(text, "mlx_budget_used_bytes") > BUDGET)
                done.wait(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(220)
        done.set()
        watcher.join()
        assert len(results) == N and all(r.get("eval_count") == TOKENS for r in results), results[:1]
        assert max(seen_waiting) > 0  # they could not all start at once: some waited for memory
        assert not any(seen_over)
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert metric(text, "mlx_memory_budget_bytes") == BUDGET
        peak = metric(text, "mlx_peak_memory_bytes")
        assert 0 < peak <= BUDGET, f"MLX peaked at {peak / 1e6:.1f} MB over a {BUDGET / 1e6:.0f} MB budget"
    finally:
        proc.terminate()
        proc.wait(30)
