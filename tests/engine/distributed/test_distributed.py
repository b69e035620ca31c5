"""Two ranks over MLX's ring backend on this box (mlx.launch), tiny llama / qwen2 / llama3 models split tensor
parallel: what rank 0 serves over HTTP equals what a single process serves, through cancellations, loads and
evictions; and a rank that dies or hangs ends every request with an error instead of a hang."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from support.serving import start_group, start_process, stop_group
from support.tinymodels import build_tiny_model

GREEDY = {"temperature": 0, "num_predict": 24}
PROMPTS = ["the river runs north", "seven green tables", "quiet paper storm", "light of the cloud"]


def models(tiny_llama: Path, tiny_qwen2: Path, tiny_llama3: Path, pipe: Path) -> dict[str, Any]:
    return {"llama": {"source": str(tiny_llama)}, "qwen": {"source": str(tiny_qwen2)},
            "llama3": {"source": str(tiny_llama3)}, "pipe": {"source": str(pipe), "parallel": "pipeline"}}


@pytest.fixture(scope="module")
def servers(tiny_llama: Path, tiny_qwen2: Path, tiny_llama3: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(2-rank group, single process) with the same models; at most two resident, so a third model evicts. `pipe`
    is split by layers (3 of them: 2 on one rank, 1 on the other), the others tensor parallel."""
    pipe = build_tiny_model(tmp_path_factory.mktemp("pipe"), arch="qwen2", num_layers=3, seed=5)
    spec = models(tiny_llama, tiny_qwen2, tiny_llama3, pipe)
    group, group_url = start_group(tmp_path_factory.mktemp("group"), spec, max_loaded_models=2)
    try:
        single, single_url = start_process(tmp_path_factory.mktemp("single"), spec,
                                           log=tmp_path_factory.mktemp("single-log") / "server.log",
                                           max_loaded_models=2)
        try:
            yield group_url, single_url
        finally:
            single.terminate()
            single.wait(30)
    finally:
        stop_group(group)


def generate(url: str, model: str, prompt: str, stream: bool, **options: Any) -> str:
    body = {"model": model, "prompt": prompt, "stream": stream, "options": {**GREEDY, **options}}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] and not any("error" in x for x in lines), lines[-1]
    return "".join(x["response"] for x in lines)


def chat(url: str, model: str, prompt: str, stream: bool, **options: Any) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream,
            "options": {**GREEDY, **options}}
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] and not any("error" in x for x in lines), lines[-1]
    return "".join(x["message"]["content"] for x in lines)


def mixed(url: str) -> list[str]:
    """Four concurrent requests, two models, stream and not, generate and chat; then two seeded sampled ones."""
    calls = [(generate, "llama", PROMPTS[0], True), (chat, "qwen", PROMPTS[1], False),
             (chat, "llama", PROMPTS[2], True), (generate, "qwen", PROMPTS[3], False)]
    out: list[str] = [""] * len(calls)

    def one(i: int) -> None:
        fn, model, prompt, stream = calls[i]
        out[i] = fn(url, model, prompt, stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(out), out
    sampled = [generate(url, "llama", "tell me", True, temperature=0.9, seed=s, num_predict=16) for s in (11, 12)]
    # ~1,500 prompt tokens: prefilled over several iterations, in a step plan too big for the inline buffer.
    long = generate(url, "qwen", " ".join(PROMPTS * 90), False, num_predict=8)
    return out + sampled + [long]


def test_two_ranks_answer_as_one_process(servers: tuple[str, str]) -> None:
    group, single = servers
    got = mixed(group)
    assert got == mixed(single)
    assert got[4] != got[5]  # the seeds matter: sampling really ran
    health = httpx.get(f"{group}/health", timeout=10).json()
    world = health["distributed"]
    assert world["world_size"] == 2 and world["backend"] == "ring" and all(r["alive"] for r in world["ranks"])
    assert world["largest_plan_bytes"] > 4096  # the long prompt's plan took the second collective
    ps = httpx.get(f"{group}/api/ps", timeout=10).json()["models"]
    assert ps and all(m["sharded"]["ranks"] == 2 for m in ps)


def test_ranks_stay_in_step_through_a_cancel_a_load_and_an_eviction(servers: tuple[str, str]) -> None:
    group, single = servers
    # A stream the client abandons half-way: rank 0 cancels it, and every rank drops it in the same iteration.
    body = {"model": "llama", "prompt": "go on and on", "options": {"temperature": 0, "num_predict": 400}}
    with httpx.stream("POST", f"{group}/api/generate", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n == 5:
                break
    # One model streams while the other two load in turn; with two resident at most, each load evicts one.
    stream_out: dict[str, str] = {}

    def long_stream(url: str) -> None:
        stream_out[url] = generate(url, "llama", PROMPTS[0], True, num_predict=120)

    answers = {}
    for url in (group, single):
        t = threading.Thread(target=long_stream, args=(url,))
        t.start()
        answers[url] = [generate(url, "llama3", PROMPTS[1], False), generate(url, "qwen", PROMPTS[2], False),
                        generate(url, "llama3", PROMPTS[3], True)]
        t.join(180)
    assert answers[group] == answers[single] and stream_out[group] == stream_out[single]
    assert mixed(group) == mixed(single)
    health = httpx.get(f"{group}/health", timeout=10).json()
    assert health["status"] == "healthy"


def test_a_model_split_by_layers_answers_as_one_process(servers: tuple[str, str]) -> None:
    group, single = servers
    got: dict[str, list[str]] = {}
    for url in (group, single):
        out = [""] * 3

        def one(i: int) -> None:
            out[i] = (generate if i % 2 else chat)(url, "pipe", PROMPTS[i], bool(i % 2))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        # The same prompt again (no stored prompt cache when pipelined: every rank prefills it whole again).
        got[url] = out + [chat(url, "pipe", PROMPTS[0], False),
                          generate(url, "pipe", "tell me", True, temperature=0.9, seed=5, num_predict=16)]
    assert got[group] == got[single] and all(got[group])
    ps = {m["name"]: m for m in httpx.get(f"{group}/api/ps", timeout=10).json()["models"]}
    assert ps["pipe"]["sharded"]["method"] == "pipeline"


def rank_pid(url: str, rank: int) -> int:
    ranks = httpx.get(f"{url}/health", timeout=10).json()["distributed"]["ranks"]
    return next(r["pid"] for r in ranks if r["rank"] == rank)


def unsplittable(tiny_llama: Path, tmp_path: Path) -> Path:
    """A model whose mlx_lm class has no shard() (gemma2's): only its config.json is ever read."""
    out = tmp_path / "unsplittable"
    shutil.copytree(tiny_llama, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma2"}))
    return out


def broken_group(tmp_path: Path, tiny_llama: Path, hurt: signal.Signals) -> tuple[list[dict], float, int, dict, str]:
    """Start a group, start a stream, hurt rank 1; returns the stream's lines after that, how long until /health said
    unhealthy, a new request's status and body, and the log. On the way, a model that cannot be split is refused."""
    proc, url = start_group(tmp_path, {"llama": {"source": str(tiny_llama)},
                                       "gemma": {"source": str(unsplittable(tiny_llama, tmp_path))}},
                            "--rank-timeout", "6")
    follower = rank_pid(url, 1)
    try:
        problems: dict = {}
        for _ in range(100):  # checked in the background at start
            problems = httpx.get(f"{url}/health", timeout=10).json()["model_problems"]
            if "gemma" in problems:
                break
            time.sleep(0.1)
        assert "cannot be split across ranks" in json.dumps(problems.get("gemma")), problems
        refused = httpx.post(f"{url}/api/generate", json={"model": "gemma", "prompt": "hi", "stream": False},
                             timeout=60)
        assert refused.status_code >= 400 and "cannot be split across ranks" in refused.json()["error"]
        body = {"model": "llama", "prompt": "go on", "options": {"temperature": 0, "num_predict": 100000}}
        after: list[dict] = []
        with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            os.kill(follower, hurt)
            hurt_at = time.monotonic()
            for line in lines:  # must end (with an error line), not hang: the read timeout would fail the test
                if line:
                    after.append(json.loads(line))
        unhealthy_after = -1.0
        new: httpx.Response | None = None
        while time.monotonic() - hurt_at < 30:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.json()["status"] == "unhealthy":
                unhealthy_after = time.monotonic() - hurt_at
                new = httpx.post(f"{url}/api/generate", json={"model": "llama", "prompt": "hi", "stream": False},
                                 timeout=10)
                break
            time.sleep(0.1)
        assert new is not None, "rank 0 never said unhealthy"
        leader = rank_pid_gone_after(proc, url)
        assert leader < 30, "rank 0 did not exit"
        if hurt == signal.SIGSTOP:
            os.kill(follower, signal.SIGKILL)  # a stopped process cannot take the launcher's SIGTERM
        proc.wait(30)  # then the launcher exits (launchd restarts the group)
        return after, unhealthy_after, new.status_code, new.json(), (tmp_path / "group.log").read_text()
    finally:
        if hurt == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(follower, signal.SIGKILL)
        stop_group(proc)


def rank_pid_gone_after(proc: subprocess.Popen, url: str) -> float:
    """Seconds until rank 0 stops answering (its process exited)."""
    start = time.monotonic()
    while time.monotonic() - start < 30:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.HTTPError:
            return time.monotonic() - start
        time.sleep(0.2)
    return 30.0


def test_a_killed_rank_ends_every_request_with_an_error(tmp_path: Path, tiny_llama: Path) -> None:
    after, unhealthy_after, status, body, log = broken_group(tmp_path, tiny_llama, signal.SIGKILL)
    assert after and "error" in after[-1], after[-3:]
    assert 0 <= unhealthy_after < 30 and status == 503 and "error" in body, (unhealthy_after, status, body)


def test_a_hung_rank_is_caught_by_the_watchdog(tmp_path: Path, tiny_llama: Path) -> None:
    after, unhealthy_after, status, body, log = broken_group(tmp_path, tiny_llama, signal.SIGSTOP)
    assert after and "error" in after[-1] and "waited more than 6s" in after[-1]["error"], after[-3:]
    assert 0 <= unhealthy_after < 30 and status == 503 and "error" in body, (unhealthy_after, status, body)
    assert "Node with rank 0 exited with code 1" in log, log[-2000:]
