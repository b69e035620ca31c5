"""/health and /metrics stay instant while a model loads and while others generate."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from support.serving import make_config, serve
from support.tinymodels import build_tiny_model


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Big enough that loading takes a while on this CPU (hundreds of MB of float32 weights).
    return build_tiny_model(tmp_path_factory.mktemp("heavy"), hidden_size=1024, num_layers=8, seed=5)


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_health_fast_while_loading_and_generating(heavy: Path, tiny_llama: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"heavy": {"source": str(heavy)}, "small": {"source": str(tiny_llama)}})
    with serve(config) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.get("/health")  # connection warm-up
        stream_done = threading.Event()

        def generate_small() -> None:
            with httpx.stream("POST", f"{server.url}/api/generate", timeout=60, json={
                    "model": "small", "prompt": "go", "options": {"num_predict": 400}}) as r:
                for _ in r.iter_lines():
                    pass
            stream_done.set()

        def load_heavy() -> None:
            httpx.post(f"{server.url}/api/generate", json={"model": "heavy"}, timeout=120)

        gen = threading.Thread(target=generate_small)
        gen.start()
        loader = threading.Thread(target=load_heavy)
        loader.start()
        latencies: list[float] = []
        saw_loading = saw_generating = False
        while loader.is_alive() or gen.is_alive():
            t = time.perf_counter()
            r = client.get("/health")
            latencies.append(time.perf_counter() - t)
            body = r.json()
            assert r.status_code == 200 and body["status"] == "healthy"
            saw_loading |= any(m["is_loading"] for m in body["cached_models"])
            saw_generating |= body["active_requests"] > 0
            time.sleep(0.01)
        gen.join()
        loader.join()
        assert saw_loading and saw_generating
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 0.05, f"p99 {p99 * 1000:.1f} ms over {len(latencies)} probes"
        metrics = client.get("/metrics").text
        assert "mlx_active_memory_bytes" in metrics
    assert "mlx_model_loads_total 2.0" in metrics and 'mlx_requests_total{model="heavy"' in metrics


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_health_and_metrics_show_prefill_progress(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "long", seed=6, max_position_embeddings=8192)
    config = make_config(tmp_path, {"m": {"source": str(model)}}, prefill_chunk=16, prefill_slice=0.01)
    prompt = " ".join(["river stone apple cloud"] * 200)  # thousands of tokens, 16 per chunk
    with serve(config) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        done = threading.Event()

        def generate_long() -> None:
            httpx.post(f"{server.url}/api/generate", timeout=120, json={
                "model": "m", "prompt": prompt, "raw": True, "stream": False, "options": {"num_predict": 1}})
            done.set()

        threading.Thread(target=generate_long, daemon=True).start()
        seen: list[dict] = []
        while not done.is_set() and len(seen) < 2:
            body = client.get("/health").json()
            if body["prefill"] and 0 < body["prefill"][0]["prefilled"] < body["prefill"][0]["total"]:
                seen.append(body)
                metrics = client.get("/metrics").text
            time.sleep(0.05)
        assert len(seen) == 2, "a long prompt's prefill was never visible in /health"
        first, second = (b["prefill"][0] for b in seen)
        assert first["model"] == "m" and first["total"] == second["total"] > 1000
        assert second["prefilled"] > first["prefilled"]  # progress moves
        assert seen[1]["prefill_queue_tokens"] == second["total"] - second["prefilled"]
        queued = next(line for line in metrics.splitlines() if line.startswith("mlx_prefill_queue_tokens "))
        assert 0 < float(queued.split()[1]) < second["total"]
        assert 'mlx_prefill_progress_ratio{model="m"' in metrics
        assert done.wait(120)
        assert client.get("/health").json()["prefill"] == []


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_health_says_why_models_cannot_be_served(tiny_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")  # present on disk; its load fails
    config = make_config(tmp_path, {"ok": {"source": str(tiny_llama)}, "gone": {"source": str(tmp_path / "nope")},
                                    "broken": {"source": str(broken)}})
    with serve(config) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = client.get("/health").json()
        assert body["status"] == "healthy"  # the others still serve
        assert [p["reason"] for p in body["model_problems"]["gone"]] == ["missing"]
        assert "ok" not in body["model_problems"] and "broken" not in body["model_problems"]
        failed = client.post("/api/generate", json={"model": "broken", "prompt": "hi", "stream": False})
        assert failed.status_code >= 400
        problems = client.get("/health").json()["model_problems"]["broken"]
        assert problems[0]["reason"] == "load_failed" and failed.json()["error"] in problems[0]["message"]
        assert client.post("/api/generate", json={"model": "ok", "prompt": "hi", "stream": False,
                                                  "options": {"num_predict": 2}}).status_code == 200
