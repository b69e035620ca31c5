"""A short, bounded run of scripts/loadtest.py against a real server process: nothing lost, nothing unexpected.

16 clients for ~10 s over three tiny models and every routed dialect, streaming and not, random priorities and
random hang-ups. The queue is tiny (4 running + 2 waiting) so designed 503 refusals must happen, and the memory
budget fits two of the three models, so loads, evictions and budget refusals happen under load too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from support.serving import make_config, start_process

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


loadtest = load_script("loadtest")


def test_bounded_load(tiny_llama: Path, tiny_qwen2: Path, tiny_llama3: Path, tmp_path: Path) -> None:
    from mlx_server.engine.prepare.stage import Preparer

    models = {"llama": {"source": str(tiny_llama)}, "qwen": {"source": str(tiny_qwen2)},
              "llama3": {"source": str(tiny_llama3)}}
    # Size the budget from the server's own estimates: the two largest fit, all three never do.
    preparer = Preparer(make_config(tmp_path, models))
    sizes = sorted(preparer.files(name).weights for name in models)
    budget = sizes[1] + sizes[2] + sizes[0] // 2  # and room for some KV beside the two (it counts too)
    assert sum(sizes) > budget
    # Its own process, as in production: in-process, the server would share (and collect) the whole test run's heap.
    proc, url = start_process(tmp_path, models, log=tmp_path / "server.log", memory_budget=budget, max_concurrent=4,
                              max_queue=2)
    try:
        report = asyncio.run(loadtest.run_load(url, list(models), clients=16, duration=10.0, max_tokens=16,
                                               timeout=60.0, settle=20.0, seed=1, log=lambda *_: None))
        summary = report.summary()
        print(summary)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(30)
    assert summary["lost"] == 0 and summary["unexpected"] == 0, summary["problems"]
    assert summary["stuck_in_server"] == 0, summary
    assert summary["completed"] > 50 and summary["refused"] > 0, summary  # the tiny queue must have refused some
    assert summary["disconnected"] > 0, summary
    assert set(summary["by_dialect"]) == set(loadtest.ROUTES), summary["by_dialect"]  # all five dialects routed
    assert summary["budget_bytes"] == pytest.approx(budget, rel=0.01)
    assert 0 < summary["peak_resident_bytes"] <= budget, summary
    assert "mlx_model_loads_total" in metrics
