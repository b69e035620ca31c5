"""The model catalog: disk work (locate, GGUF headers) runs off the event loop, so /health never waits on it."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx
import numpy as np
import pytest
from gguf import GGUFWriter

from mlx_server.api.catalog import Catalog
from mlx_server.contract.errors import ModelNotFound
from mlx_server.models.info import InfoCache, ModelInfo
from mlx_server.models.sources import Located
from mlx_server.serve import build_app
from support.serving import Server, free_port, make_config, serve

HEALTH_LIMIT = 0.5  # seconds: far below the seconds a GGUF header takes, far above a loaded machine's jitter


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF whose header holds a 100,000-token vocabulary: gguf-py takes seconds to parse it, like a real
    model's (the weights are one tiny tensor, so the file stays a few MB)."""
    path = tmp_path_factory.mktemp("big-gguf") / "big.gguf"
    n = 100_000
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(8192)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    writer.add_token_list([f"tok{i}" for i in range(n)])
    writer.add_token_scores([0.0] * n)
    writer.add_token_types([1] * n)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Probe:
    """GETs /health in a loop from its own thread and records each answer's latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                r = client.get("/health")
                assert r.status_code == 200
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    def __enter__(self) -> "Probe":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def in_thread(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_health_answers_while_the_first_tags_parses_a_large_gguf(big_gguf: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"big": {"source": str(big_gguf)}})
    with serve(config) as server:  # start-up begins reading the header in the background
        tags, answer = in_thread(lambda: httpx.get(f"{server.url}/api/tags", timeout=120))
        with Probe(server.url) as probe:
            while tags.is_alive():
                time.sleep(0.02)
            during = len(probe.latencies)
        tags.join()
    assert answer and [m["name"] for m in answer[0].json()["models"]] == ["big"]
    assert answer[0].json()["models"][0]["details"]["format"] == "gguf"
    assert max(probe.latencies) < HEALTH_LIMIT, sorted(probe.latencies)[-5:]
    assert during >= 3, f"the header was read before /health was probed ({during} probes): the test saw nothing"


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_health_answers_while_model_info_is_blocked(tiny_llama: Path, tmp_path: Path) -> None:
    """Deterministic: the computation cannot finish until the test says so, so /health answering at all proves
    the loop is free, and /api/tags must still be waiting."""
    entered, release = threading.Event(), threading.Event()
    calls: list[Path] = []
    real = InfoCache()

    def slow_describe(found: Located) -> Optional[ModelInfo]:
        calls.append(found.path)  # type: ignore[arg-type]
        entered.set()
        release.wait(60)
        return real.describe(found)

    config = make_config(tmp_path, {"tiny": {"source": str(tiny_llama), "aliases": ["t"]}})
    server = Server(build_app(config, catalog=Catalog(config, describe=slow_describe)), free_port()).start()
    try:
        assert entered.wait(30), "start-up did not begin warming the catalog"
        tags, answer = in_thread(lambda: httpx.get(f"{server.url}/api/tags", timeout=60))
        show, shown = in_thread(lambda: httpx.post(f"{server.url}/api/show", json={"model": "t"}, timeout=60))
        with Probe(server.url) as probe:
            while len(probe.latencies) < 10:
                time.sleep(0.02)
        assert tags.is_alive() and show.is_alive()  # both still wait on the one computation
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.get("/api/version").status_code == 200
        release.set()
        tags.join(30)
        show.join(30)
    finally:
        release.set()
        server.stop()
    assert max(probe.latencies) < HEALTH_LIMIT, sorted(probe.latencies)[-5:]
    assert [m["name"] for m in answer[0].json()["models"]] == ["tiny", "t"]
    assert shown[0].status_code == 200 and shown[0].json()["details"]["family"] == "llama"
    assert len(calls) == 1  # warm-up, /api/tags and /api/show shared one computation


def test_ps_context_length_is_an_integer(tiny_llama: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"native": {"source": str(tiny_llama)},
                                    "capped": {"source": str(tiny_llama), "context_length": 512},
                                    "roomy": {"source": str(tiny_llama), "context_length": 10**6}})
    with serve(config) as server, server.client() as c:
        for name in ("native", "capped", "roomy"):
            assert c.post("/api/generate", json={"model": name}).json()["done_reason"] == "load"
        ps = {m["name"]: m["context_length"] for m in c.get("/api/ps").json()["models"]}
    # The context a loaded model really has: configured, even past the model's own (2048 in its config.json), as
    # Ollama honours num_ctx (with a warning); else the model's own.
    assert ps == {"native": 2048, "capped": 512, "roomy": 10**6}


# ---- the catalog on its own ----------------------------------------------------------------------------------


class Counting:
    """The real describe, counting calls; optionally held until released."""

    def __init__(self, hold: bool = False) -> None:
        self.real = InfoCache()
        self.calls = 0
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, found: Located) -> Optional[ModelInfo]:
        self.calls += 1
        self.release.wait(30)
        return self.real.describe(found)


@pytest.fixture
def catalog_of(tmp_path: Path) -> Iterator[Callable[..., Catalog]]:
    made: list[Catalog] = []

    def make(models: dict[str, dict[str, object]], **kw: object) -> Catalog:
        catalog = Catalog(make_config(tmp_path, models), **kw)  # type: ignore[arg-type]
        made.append(catalog)
        return catalog

    yield make
    for catalog in made:
        catalog.close()


def test_a_model_copied_in_after_start_is_found_without_a_restart(tiny_llama: Path, tmp_path: Path,
                                                                   catalog_of: Callable[..., Catalog]) -> None:
    catalog = catalog_of({"late": {"source": "late-model"}})

    async def run() -> None:
        with pytest.raises(ModelNotFound) as err:
            await catalog.resolve("late")
        assert "late-model" in str(err.value.message)
        shutil.copytree(tiny_llama, tmp_path / "late-model")
        assert await catalog.resolve("late:latest") == "late"
        assert (await catalog.info("late")) is not None

    asyncio.run(run())


def test_concurrent_requests_share_one_computation(tiny_llama: Path, catalog_of: Callable[..., Catalog]) -> None:
    describe = Counting()
    catalog = catalog_of({"m": {"source": str(tiny_llama)}}, describe=describe)

    async def run() -> None:
        got = await asyncio.gather(*(catalog.info("m") for _ in range(20)), catalog.entries())
        assert all(info is not None and info.family == "llama" for info in got[:20])

    asyncio.run(run())
    assert describe.calls == 1


def test_invalidate_discards_a_computation_already_running(tiny_llama: Path,
                                                          catalog_of: Callable[..., Catalog]) -> None:
    describe = Counting(hold=True)
    catalog = catalog_of({"m": {"source": str(tiny_llama)}}, describe=describe)

    async def run() -> None:
        first = asyncio.ensure_future(catalog.entry("m"))
        while describe.calls == 0:
            await asyncio.sleep(0.01)
        catalog.invalidate("m")  # e.g. /api/delete finished while the old answer was being computed
        describe.release.set()
        await first  # its waiter still gets an answer...
        await catalog.entry("m")  # ...but it was not cached: this one looks again
        assert describe.calls == 2
        await catalog.entry("m")
        assert describe.calls == 2

    asyncio.run(run())


def test_stale_entries_are_served_then_refreshed_in_the_background(tiny_llama: Path,
                                                                    catalog_of: Callable[..., Catalog]) -> None:
    now = [0.0]
    describe = Counting()
    catalog = catalog_of({"m": {"source": str(tiny_llama)}}, describe=describe, refresh_after=10.0,
                         clock=lambda: now[0])

    async def run() -> None:
        first = await catalog.entry("m")
        now[0] = 5.0
        assert await catalog.entry("m") is first and describe.calls == 1  # fresh: no disk at all
        now[0] = 11.0
        describe.release.clear()  # hold the refresh, to show the stale answer comes back without waiting for it
        assert await catalog.entry("m") is first
        describe.release.set()
        deadline = time.monotonic() + 10
        while (await catalog.entry("m")) is first and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert describe.calls == 2 and (await catalog.entry("m")) is not first

    asyncio.run(run())
