#!/usr/bin/env python3
"""Load test: N concurrent clients for a bounded time against an mlx-server on 127.0.0.1, then a verdict.

Every request ends in exactly one bucket:
  completed     2xx with a well-formed body, or a stream that ended with its dialect's final frame
  refused       503 with the dialect's error body: a designed refusal (queue full, memory budget)
  unexpected    any other non-2xx, a malformed body, a stream that carried an error frame, a broken connection
  lost          neither: a stream that ended without a final or error frame, or no answer before the client timeout
  disconnected  we hung up on purpose (mid-stream, or while a non-streaming request waited)
Afterwards the server must drain to zero active and queued requests (else: stuck), and the resident model bytes
seen in /health and /api/ps must never exceed the memory budget. Exit status 1 on any lost, unexpected, stuck
or over-budget. By default it builds three tiny models (tests/support/tinymodels.py) and starts its own server.

  .venv/bin/python scripts/loadtest.py                       # 64 clients, 30 s, three tiny models
  .venv/bin/python scripts/loadtest.py --config models.yaml  # your models, own server subprocess
  .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:11435 --clients 16 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional
from urllib.parse import urlparse

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {"ollama-chat": "/api/chat", "ollama-generate": "/api/generate", "openai-chat": "/v1/chat/completions",
          "openai-completions": "/v1/completions", "anthropic-messages": "/v1/messages"}
WORDS = ("river stone light garden window winter bridge candle forest market letter silver harbor engine "
         "morning planet violin shadow ladder orchard").split()
PRIORITIES = (None, "high", "medium", "low")
TINY_PADDING_MB = (16, 24, 32)  # distinct on-disk sizes, so the budget arithmetic is visible in /api/ps


# ---- requests and their verdicts ------------------------------------------------------------------------------


def make_body(dialect: str, model: str, stream: bool, max_tokens: int, rng: random.Random) -> dict[str, Any]:
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
    body: dict[str, Any] = {"model": model, "stream": stream}
    if dialect in ("ollama-generate", "openai-completions"):
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    if dialect.startswith("ollama"):
        body["options"] = {"num_predict": max_tokens}
    else:
        body["max_tokens"] = max_tokens
    return body


def error_shaped(dialect: str, raw: bytes) -> bool:
    """The body every client of this dialect can parse as an error."""
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    err = body.get("error")
    if dialect.startswith("ollama"):
        return isinstance(err, str) and bool(err)
    if dialect.startswith("openai"):
        return isinstance(err, dict) and isinstance(err.get("message"), str)
    return body.get("type") == "error" and isinstance(err, dict) and isinstance(err.get("message"), str)


def error_message(raw: bytes) -> str:
    err = json.loads(raw)["error"]
    return err if isinstance(err, str) else str(err.get("message"))


def frame_verdict(dialect: str, event: str, data: str) -> Optional[str]:
    """'done' for a dialect's final frame, 'error' for an error frame, None for an ordinary one."""
    if dialect.startswith("ollama"):
        obj = json.loads(data)
        return "error" if "error" in obj else ("done" if obj.get("done") is True else None)
    if dialect.startswith("openai"):
        return "done" if data == "[DONE]" else ("error" if "error" in json.loads(data) else None)
    return {"message_stop": "done", "error": "error"}.get(event)


async def frames(response: httpx.Response, ndjson: bool) -> AsyncIterator[tuple[str, str]]:
    """(event, data) per NDJSON line or SSE event; SSE comments (pings) are skipped."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if ndjson:
            if line.strip():
                yield "message", line
            continue
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield event, "\n".join(data)


@dataclass
class Outcome:
    kind: str  # completed | refused | unexpected | lost | disconnected
    dialect: str
    latency: float
    priority: Optional[str] = None
    detail: str = ""
    model: str = ""


async def one_request(client: httpx.AsyncClient, dialect: str, body: dict[str, Any], priority: Optional[str],
                      hang_up_after: Optional[int], timeout: float) -> Outcome:
    started = time.perf_counter()
    path, stream = ROUTES[dialect], bool(body["stream"])

    def out(kind: str, detail: str = "") -> Outcome:
        return Outcome(kind, dialect, time.perf_counter() - started, priority, detail, str(body["model"]))

    headers = {"x-request-priority": priority} if priority else {}

    async def attempt() -> Outcome:
        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                raw = await r.aread()
                shaped = error_shaped(dialect, raw)
                if r.status_code == 503 and shaped:
                    return out("refused", error_message(raw))
                return out("unexpected", f"{r.status_code} {raw[:200]!r}")
            ctype = r.headers.get("content-type", "")
            if not stream:
                raw = await r.aread()
                try:
                    parsed = json.loads(raw)
                    ok = isinstance(parsed, dict) and "error" not in parsed
                except ValueError:
                    ok = False
                return out("completed") if ok else out("unexpected", f"bad body {raw[:200]!r}")
            verdict, seen = None, 0
            async for event, data in frames(r, "ndjson" in ctype):
                seen += 1
                if hang_up_after is not None and seen >= hang_up_after:
                    return out("disconnected")  # leaving the block closes the connection mid-stream
                try:
                    verdict = frame_verdict(dialect, event, data) or verdict
                except ValueError:
                    return out("unexpected", f"malformed frame {data[:200]!r}")
            if verdict == "done":
                return out("completed")
            if verdict == "error":
                return out("unexpected", "error frame in stream")
            return out("lost", f"stream ended without a final frame after {seen} frames")

    try:
        return await asyncio.wait_for(attempt(), timeout)
    except asyncio.TimeoutError:
        return out("lost", f"no complete answer within {timeout:g}s")
    except httpx.HTTPError as exc:
        return out("unexpected", f"broken connection: {type(exc).__name__} {exc}")


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    peak_resident_bytes: int = 0  # max over polls of /metrics mlx_resident_bytes and the sum of /api/ps sizes
    peak_health_resident_bytes: int = 0  # the same from /health memory.resident_gb (1 MB resolution)
    peak_rss_bytes: int = 0  # server process RSS, when we know its pid
    budget_bytes: int = 0
    stuck: int = 0  # active + queued requests the server still held after the settle time
    dialects: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def latency(self, q: float, priority: Any = "any") -> Optional[float]:
        xs = sorted(o.latency for o in self.outcomes
                    if o.kind == "completed" and (priority == "any" or o.priority == priority))
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    @property
    def ok(self) -> bool:
        return (self.count("lost") == 0 and self.count("unexpected") == 0 and self.stuck == 0
                and (self.budget_bytes == 0 or self.peak_resident_bytes <= self.budget_bytes))

    def summary(self) -> dict[str, Any]:
        ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
        problems = [f"{o.kind} {o.dialect}: {o.detail}" for o in self.outcomes if o.kind in ("lost", "unexpected")]
        return {"requests": len(self.outcomes), **{k: self.count(k) for k in
                ("completed", "refused", "unexpected", "lost", "disconnected")},
                "stuck_in_server": self.stuck, "p50_ms": ms(self.latency(0.5)), "p99_ms": ms(self.latency(0.99)),
                "p50_ms_by_priority": {str(p): ms(self.latency(0.5, p)) for p in PRIORITIES},
                "by_dialect": {d: sum(1 for o in self.outcomes if o.dialect == d) for d in self.dialects},
                "completed_by_model": dict(Counter(o.model for o in self.outcomes if o.kind == "completed")),
                "refused_by_reason": dict(Counter(
                    "memory budget" if "memory" in o.detail else "queue full" if "busy" in o.detail else o.detail[:60]
                    for o in self.outcomes if o.kind == "refused")),
                "peak_resident_bytes": self.peak_resident_bytes, "budget_bytes": self.budget_bytes,
                "peak_health_resident_bytes": self.peak_health_resident_bytes,
                "peak_server_rss_bytes": self.peak_rss_bytes, "wall_s": round(self.wall_s, 1),
                "problems": problems[:20], "ok": self.ok}


async def route_exists(client: httpx.AsyncClient, path: str) -> bool:
    """A POST-only route answers GET with 405; a missing one with 404 (model lookup never runs)."""
    return (await client.get(path)).status_code != 404


async def poll_memory(client: httpx.AsyncClient, report: Report, pid: Optional[int], stop: asyncio.Event) -> None:
    proc = None
    if pid is not None:
        import psutil

        proc = psutil.Process(pid)
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            # /health rounds to 1 MB (GB with 3 decimals); /metrics gauges and /api/ps sizes are exact bytes.
            mem = (await client.get("/health")).json()["memory"]
            gauges = {ln.split()[0]: float(ln.split()[1]) for ln in (await client.get("/metrics")).text.splitlines()
                      if ln.startswith(("mlx_resident_bytes ", "mlx_memory_budget_bytes "))}
            ps = sum(m["size"] for m in (await client.get("/api/ps")).json()["models"])
            report.budget_bytes = int(gauges.get("mlx_memory_budget_bytes", mem["budget_gb"] * 1e9))
            exact = max(ps, int(gauges.get("mlx_resident_bytes", 0)))
            report.peak_resident_bytes = max(report.peak_resident_bytes, exact)
            report.peak_health_resident_bytes = max(report.peak_health_resident_bytes, int(mem["resident_gb"] * 1e9))
        if proc is not None:
            with contextlib.suppress(Exception):
                report.peak_rss_bytes = max(report.peak_rss_bytes, proc.memory_info().rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def run_load(url: str, models: list[str], *, clients: int = 64, duration: float = 30.0,
                   max_tokens: int = 24, stream_share: float = 0.6, disconnect_share: float = 0.1,
                   timeout: float = 120.0, settle: float = 30.0, seed: int = 0, pid: Optional[int] = None,
                   refusal_backoff: float = 0.25,
                   log: Any = print) -> Report:
    """Drive `clients` loops until `duration` has passed; requests then in flight get `timeout` to finish."""
    report = Report()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        report.dialects = [d for d, p in ROUTES.items() if await route_exists(client, p)]
        skipped = sorted(set(ROUTES) - set(report.dialects))
        log(f"dialects: {', '.join(report.dialects)}"
            + (f" (skipped, route 404: {', '.join(skipped)})" if skipped else ""))
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_memory(client, report, pid, stop))
        began = time.monotonic()
        deadline = began + duration

        async def loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                dialect, model = rng.choice(report.dialects), rng.choice(models)
                stream = rng.random() < stream_share
                body = make_body(dialect, model, stream, rng.randint(1, max_tokens), rng)
                hang_up = rng.random() < disconnect_share
                priority = rng.choice(PRIORITIES)
                if hang_up and not stream:
                    # A non-streaming client that gives up while queued or generating: cancel after a short wait.
                    task = asyncio.ensure_future(one_request(client, dialect, body, priority, None, timeout))
                    done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.02, 0.5))
                    if done:
                        report.outcomes.append(task.result())
                    else:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                        report.outcomes.append(Outcome("disconnected", dialect, 0.0, priority, "", model))
                    continue
                outcome = await one_request(client, dialect, body, priority, rng.randint(1, 3) if hang_up else None,
                                            timeout)
                report.outcomes.append(outcome)
                if outcome.kind == "refused":
                    # Like a polite client: back off after a 503 instead of hammering a full queue at once.
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * refusal_backoff)

        await asyncio.gather(*(loop(i) for i in range(clients)))
        report.wall_s = time.monotonic() - began
        # The server must drain: cancelled and finished requests leave no active or queued work behind.
        settle_until = time.monotonic() + settle
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                h = (await client.get("/health")).json()
                report.stuck = int(h["active_requests"]) + int(h["queue_size"])
            if report.stuck == 0 or time.monotonic() > settle_until:
                break
            await asyncio.sleep(0.2)
        stop.set()
        await poller
    return report


# ---- a server of our own -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_models(where: Path) -> dict[str, dict[str, Any]]:
    """Three tiny checkpoints (three architectures / templates), built once and reused from `where`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.tinymodels import build_tiny_model  # noqa: PLC0415 - test helper, only needed here

    specs = [("tiny-llama", dict(arch="llama", seed=0)), ("tiny-qwen2", dict(arch="qwen2", seed=1)),
             ("tiny-llama3", dict(arch="llama", template="llama3", seed=2))]
    models = {}
    for (name, kw), pad in zip(specs, TINY_PADDING_MB, strict=True):
        out = where / name
        if not (out / "model.safetensors").exists():
            build_tiny_model(out, padding_bytes=pad * 2**20, **kw)  # type: ignore[arg-type]
        models[name] = {"source": str(out)}
    return models


@contextlib.contextmanager
def server_process(config: dict[str, Any], workdir: Path, log_level: str = "warning",
                   argv: Optional[list[str]] = None) -> Iterator[tuple[str, int]]:
    """Start `python -m mlx_server serve` (or `argv`) on 127.0.0.1 with this config; SIGTERM and reap it after."""
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
    cfg = workdir / "models.yaml"
    cfg.write_text(yaml.safe_dump(config))
    logfile = open(workdir / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*(argv or [sys.executable, "-m", "mlx_server"]), "--config", str(cfg),
                             "--log-level", log_level, "serve"], cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {workdir / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy within 60 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()


def user_config(path: Path) -> dict[str, Any]:
    """A models.yaml to run with a port of our choosing; its relative sources stay relative to its own folder."""
    config = yaml.safe_load(path.read_text())
    for model in (config.get("models") or {}).values():
        if isinstance(model, dict) and str(model.get("source", "")).startswith("."):
            model["source"] = str((path.parent / model["source"]).resolve())
    return config


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {host!r}: only servers on 127.0.0.1 are allowed")
    return url.rstrip("/")


def tiny_config(where: Path, max_queue: int, max_concurrent: int, tight: bool) -> dict[str, Any]:
    # Roomy: all three fit. Tight: any two fit, never three (each needs padding + ~1.5 MB of weights and KV).
    budget = f"{sum(TINY_PADDING_MB[1:]) + 8}MiB" if tight else "1GB"
    return {"server": {"memory_budget": budget, "max_loaded_models": 3, "keep_alive": "10m",
                       "max_queue": max_queue, "max_concurrent": max_concurrent, "cache_dir": str(where / "cache")},
            "models": build_tiny_models(where / "models")}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", help="three tiny models and an own server (the default)")
    src.add_argument("--config", type=Path, help="models.yaml to start an own server with")
    src.add_argument("--url", help="an already running server on 127.0.0.1")
    ap.add_argument("--models", help="comma-separated model names (default: the first three listed)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of new requests (hard stop after)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-queue", type=int, default=32, help="own tiny server: server.max_queue")
    ap.add_argument("--max-concurrent", type=int, default=8, help="own tiny server: server.max_concurrent")
    ap.add_argument("--tight-budget", action="store_true", help="own tiny server: a budget that fits two models")
    ap.add_argument("--tiny-dir", type=Path, help="build (or reuse) the tiny models here instead of a temp dir")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request; later counts as lost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)

    with contextlib.ExitStack() as stack:
        pid: Optional[int] = None
        if args.url:
            url = loopback_only(args.url)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlx-loadtest-")))
            if args.config:
                config = user_config(args.config)
            else:
                config = tiny_config(args.tiny_dir or work, args.max_queue, args.max_concurrent, args.tight_budget)
            url, pid = stack.enter_context(server_process(config, work))
        tags = httpx.get(f"{url}/api/tags", timeout=10).json()["models"]
        listed = list(dict.fromkeys(m["model"] for m in tags))  # aliases are listed too, under their target
        models = args.models.split(",") if args.models else listed[:3]
        print(f"load: {args.clients} clients x {args.duration:g} s against {url}, models {models}")
        report = asyncio.run(run_load(url, models, clients=args.clients, duration=args.duration,
                                      max_tokens=args.max_tokens, timeout=args.timeout, seed=args.seed, pid=pid))
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
