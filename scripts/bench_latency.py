#!/usr/bin/env python3
"""Latency under mixed load: does a long prompt freeze the others? mlx-server chunked vs unchunked vs mlx_lm.server.

Same tiny dense model, same run, three servers one after the other (never two busy at once), each a fresh process:

  A  mlx-server with chunked, time-sliced prefill (models.yaml `server: {prefill_slice: 0.05}`, the default);
  B  mlx-server unchunked (`server: {prefill_slice: 0}`: each prompt prefilled whole, like mlx_lm);
  C  `python -m mlx_lm server` with its defaults.

All three are driven by the same client code: httpx streaming against OpenAI `/v1/chat/completions` (the one
endpoint where both servers build the prompt the same way: our `/v1/completions` wraps the prompt in the chat
template, mlx_lm's takes it raw), greedy (temperature 0), with the same messages, so every server prefills the same
token ids; each request's prompt length is built exactly with the model's tokenizer and chat template and checked
against the server's `usage.prompt_tokens`. Every request has a different prompt (after the template's system
turn), so no prefix cache helps. Per server, after one small warm-up request:

  1. stall: a stream is decoding (a short prompt, many max tokens) when a LONG-token prompt arrives. The stream's
     worst gap between content chunks overlapping the long prompt's prefill (its send to its first token) ÷ the
     long prompt's time to first token. 1.0 = the stream froze for the whole prefill; goal <= 0.1;
  2. short after long: a SHORT-token request sent --delay s (0.3) after a LONG-token one. Its time to first token ÷
     its time to first token alone (median of 3 on the same idle server, just before). Goal <= 2;
  3. throughput: 8 concurrent streams (64-token prompts, 128 max tokens): generated tokens (the server's usage
     report) ÷ wall time from the first send to the last stream's end. Goal: A ÷ B >= 0.95 (chunking costs <= 5%);
  4. prefill: one PREFILL-token prompt with max_tokens 1: prompt tokens ÷ time to first token (the stream's end
     when the one token decodes to no text). Goal: A ÷ B >= 0.95; C for reference.

Metrics 1-3 are repeated --repeats times (fresh prompts each time); the table shows medians, the JSON every run.
Before the servers, the model's prefill speed is measured in-process (mlx_lm, 2048-token steps as mlx_lm.server
uses), which also leaves MLX's CPU-compiled kernels cached for the servers. The default model is a random llama,
hidden 128, 3 layers, 4 heads (2 KV): on MLX's CPU backend attention dominates a long prefill, so this is what makes
a 2,000-token prefill take a few seconds on 2 cores (and an 8,000-token one ~20-30 s).

Reading mlx_lm.server's figures (0.32): its BatchGenerator already interleaves prefill with decoding, one decode step
per --prefill-step-size (2048) prompt tokens, so a prompt under 2,048 tokens is one uninterrupted step and an
8,000-token one stalls the others for ~1/4 of its prefill; and its loop takes new requests only every 0.5 s of
generation, so a new request's TTFT includes up to 0.5 s of queueing during which other streams still run (metric 1
counts those chunks as "during the prefill", which lowers its ratio below 1.0 even though the stream froze for the
whole compute). --mlx-lm-args '--prefill-step-size 256' shows it with smaller steps. "other cores" in the JSON is
CPU used by processes other than this client and the server: on a shared 2-core box it moves every figure.

    .venv/bin/python scripts/bench_latency.py                     # full run, ~2.5 min on 2 CPU cores
    .venv/bin/python scripts/bench_latency.py --quick             # smoke-sized, ~30 s
    .venv/bin/python scripts/bench_latency.py --servers chunked,unchunked --json lat.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builder
from bench import free_port  # noqa: E402
from bench_throughput import ADJECTIVES, PEOPLE, SUBJECTS, VERBS, CpuMeter  # noqa: E402

SERVERS = {
    "chunked": "ours chunked",
    "unchunked": "ours unchunked",
    "mlx_lm": "mlx_lm server",
}


# ----------------------------------------------------------------------------------------------------- prompts


class Prompts:
    """User messages whose chat-templated prompt is exactly N tokens; identical text (so token ids) for every server."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.made: dict[str, int] = {}  # content -> its templated token count, for checking usage reports
        self.by_tag: dict[str, str] = {}

    def build_all(self, z: "Sizes") -> None:
        """Every prompt of the run, built once before any server starts (the client then only sends)."""
        want = {"W": z.short, "P": z.prefill}
        for rep in range(z.repeats):
            want.update({f"S{rep}": z.short, f"L{rep}": z.long, f"M{rep}": z.long, f"Q{rep}": z.short,
                         **{f"A{rep}.{i}": z.short for i in range(3)},
                         **{f"T{rep}.{i}": z.stream_prompt for i in range(z.streams)}})
        for tag, n in want.items():
            self.by_tag[tag] = self.make(tag, n)

    def get(self, tag: str) -> str:
        return self.by_tag[tag]

    def count(self, content: str) -> int:
        return len(self.tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))

    def make(self, tag: str, n: int) -> str:
        """A user message for a prompt of exactly n tokens. It starts with `tag` (distinct per request, a couple of
        tokens), so two prompts share only the template's system turn and no prefix cache helps."""
        rng = random.Random(tag)
        tag += ":"  # so "A1" + padding never reads as "A17" + padding
        base = self.count(tag)  # sentences are joined by spaces, which the pre-tokenizer never merges across:
        parts, total = [tag], base  # so the count is additive and the 8,000-token prompt is built in linear time
        while True:
            s = (f" {rng.choice(PEOPLE).capitalize()} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} "
                 f"{rng.choice(SUBJECTS)} {rng.randint(2, 99)} times before the {rng.choice(ADJECTIVES)} "
                 f"{rng.choice(SUBJECTS)} was finished.")
            k = len(self.tok.encode(s, add_special_tokens=False))
            if total + k > n:
                break
            parts.append(s)
            total += k
        content = "".join(parts)
        for _ in range(20):  # pad with digits (one token each after punctuation or letters), then verify
            have = self.count(content)
            if have == n:
                self.made[content] = n
                return content
            content = content + "7" * (n - have) if have < n else content[: -1]
        raise RuntimeError(f"could not build a {n}-token prompt (got {self.count(content)})")


# ----------------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    key: str
    url: str
    model: str  # the "model" field requests carry
    proc: subprocess.Popen[bytes]
    log: Path


def start(key: str, path: Path, work: Path, ctx: int, mlx_lm_args: list[str]) -> Server:
    port = free_port()
    log = work / f"{key}.log"
    if key in ("chunked", "unchunked"):
        server: dict[str, Any] = {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "cache")}
        if key == "unchunked":
            server["prefill_slice"] = 0
        # chunked: no key at all, so the default (0.05 s) is what gets measured
        cfg = work / f"{key}.yaml"
        cfg.write_text(yaml.safe_dump({"server": server, "models": {
            "bench": {"source": str(path), "keep_alive": -1, "context_length": ctx}}}))
        cmd = ["mlx_server", "--config", str(cfg), "--log-level", "warning", "serve"]
        model = "bench"
    else:  # defaults on purpose: --decode-concurrency 32, --prompt-concurrency 8, --prefill-step-size 2048
        cmd = ["mlx_lm", "server", "--model", str(path), "--port", str(port), "--host", "127.0.0.1",
               "--log-level", "WARNING", *mlx_lm_args]
        model = "default_model"
    proc = subprocess.Popen([sys.executable, "-m", *cmd], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    return Server(key, f"http://127.0.0.1:{port}", model, proc, log)


def wait_up(srv: Server, timeout: float = 300) -> None:
    """Until /health answers 200 (both servers have one; mlx_lm's answers before its model is loaded, so the
    warm-up request that follows is what waits for the load there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and srv.proc.poll() is None:
        try:
            if httpx.get(f"{srv.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{SERVERS[srv.key]} did not come up (exit code {srv.proc.poll()}); see {srv.log}")


def stop(srv: Server) -> None:
    srv.proc.terminate()
    try:
        srv.proc.wait(30)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()


# ----------------------------------------------------------------------------------------------------- client


@dataclass
class Stream:
    """One streaming request, filled in as it runs (so a caller can watch `times` while it streams)."""

    tokens_wanted: int
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of every chunk that carries generated text
    end: Optional[float] = None  # None: still running, or cancelled by the caller
    prompt_tokens: Optional[int] = None  # from the server's usage report
    cached_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish: Optional[str] = None
    retries: int = 0

    @property
    def ttft(self) -> float:
        """Send to the first text chunk; a stream that produced no text (one token decoding to nothing): its end."""
        first = self.times[0] if self.times else self.end
        if first is None:
            raise RuntimeError("stream has no first token")
        return first - self.sent

    @property
    def generated(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.times)


def _has_text(obj: dict[str, Any]) -> bool:
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        if any(delta.get(k) for k in ("content", "reasoning_content", "reasoning", "tool_calls")):
            return True
    return False


async def stream_chat(client: httpx.AsyncClient, srv: Server, content: str, st: Stream) -> Stream:
    """POST /v1/chat/completions with stream=True, recording chunk arrival times into `st`. The same for all
    servers. Cancelling the task closes the connection (both servers then drop the sequence)."""
    body = {"model": srv.model, "messages": [{"role": "user", "content": content}], "max_tokens": st.tokens_wanted,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    st.sent = time.perf_counter()
    while True:
        try:
            r = await client.send(client.build_request("POST", f"{srv.url}/v1/chat/completions", json=body),
                                  stream=True)
            break
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            # mlx_lm.server listens with a backlog of 5: a burst of 8 connects can be reset; the TTFT keeps the cost.
            st.retries += 1
            if st.retries > 5:
                raise
            await asyncio.sleep(0.05 * st.retries)
    try:
        if r.status_code != 200:
            raise RuntimeError(f"{SERVERS[srv.key]}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            line = line.strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            now = time.perf_counter()
            if "error" in obj:
                raise RuntimeError(f"{SERVERS[srv.key]}: {obj['error']}")
            if _has_text(obj):
                st.times.append(now)
            for choice in obj.get("choices") or []:
                st.finish = choice.get("finish_reason") or st.finish
            if obj.get("usage"):
                u = obj["usage"]
                st.prompt_tokens, st.completion_tokens = u.get("prompt_tokens"), u.get("completion_tokens")
                st.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    finally:
        await r.aclose()
    st.end = time.perf_counter()
    return st


# ----------------------------------------------------------------------------------------------------- metrics


@dataclass
class Sizes:
    long: int
    short: int
    stream_prompt: int
    streams: int
    stream_tokens: int
    prefill: int
    delay: float
    lead: int  # tokens the decoding stream has made before the long prompt is sent (metric 1)
    stall_stream_tokens: int  # its max tokens: more than it can make during the prefill (it is cancelled after)
    repeats: int


class Check:
    """Prompt-length bookkeeping: every usage report must match the templated count the client built."""

    def __init__(self, prompts: Prompts) -> None:
        self.prompts, self.mismatch, self.cached, self.reported = prompts, [], [], 0

    def __call__(self, content: str, st: Stream) -> Stream:
        want = self.prompts.made[content]
        self.reported += st.prompt_tokens is not None
        if st.prompt_tokens is not None and st.prompt_tokens != want:
            self.mismatch.append(f"{want}-token prompt reported as {st.prompt_tokens}")
        if st.cached_tokens:
            self.cached.append(st.cached_tokens)
        return st


async def run_one(client: httpx.AsyncClient, srv: Server, content: str, n: int, check: Check) -> Stream:
    return check(content, await stream_chat(client, srv, content, Stream(n)))


async def stall(client: httpx.AsyncClient, srv: Server, prompts: Prompts, z: Sizes, check: Check,
                rep: int) -> dict[str, Any]:
    """Metric 1: the decoding stream's worst gap during the long prompt's prefill ÷ the long prompt's TTFT."""
    s_content, l_content = prompts.get(f"S{rep}"), prompts.get(f"L{rep}")
    s = Stream(z.stall_stream_tokens)  # cancelled once it has shown it outlived the prefill
    s_task = asyncio.create_task(stream_chat(client, srv, s_content, s))
    deadline = time.perf_counter() + 60
    while len(s.times) < z.lead and not s_task.done():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"stream made {len(s.times)} chunks in 60 s")
        await asyncio.sleep(0.005)
    if s_task.done():
        await s_task  # raises its error, if any
        raise RuntimeError(f"the decoding stream ended after {len(s.times)} chunks ({s.finish}) before the long "
                           "prompt was sent")
    long = await run_one(client, srv, l_content, 4, check)
    first = long.sent + long.ttft
    # Let the stream show it survived the prefill: two more chunks after the long prompt's first token.
    deadline = time.perf_counter() + 30
    while sum(t > first for t in s.times) < 2 and not s_task.done() and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    ended_early = s_task.done()
    if ended_early:
        await s_task
    else:
        s_task.cancel()
        try:
            await s_task
        except asyncio.CancelledError:
            pass
    if s.end is not None:  # a cancelled stream has no usage report to check
        check(s_content, s)
    # Every gap between consecutive chunks that overlaps [long sent, long's first token]; if the stream ended
    # inside that window (EOS or max tokens), its end closes the last gap.
    times = s.times + ([s.end] if ended_early and s.end is not None and s.end < first else [])
    gaps = [b - a for a, b in zip(times, times[1:]) if b > long.sent and a < first]
    before = [b - a for a, b in zip(s.times, s.times[1:]) if b <= long.sent]
    worst = max(gaps) if gaps else first - long.sent  # no chunk at all after the send: frozen throughout
    return {"ratio": worst / long.ttft, "worst_gap_s": worst, "long_ttft_s": long.ttft,
            "normal_gap_ms": 1000 * statistics.median(before) if before else None,
            "stream_chunks_during_prefill": sum(long.sent < t < first for t in s.times),
            "stream_ended_early": ended_early, "stream_finish": s.finish}


async def short_after_long(client: httpx.AsyncClient, srv: Server, prompts: Prompts, z: Sizes, check: Check,
                           rep: int) -> dict[str, Any]:
    """Metric 2: a short request's TTFT when sent `delay` s after a long one ÷ its TTFT alone (median of 3)."""
    alone = []
    for i in range(3):
        c = prompts.get(f"A{rep}.{i}")
        alone.append((await run_one(client, srv, c, 4, check)).ttft)
        await asyncio.sleep(0.05)
    l_content, q_content = prompts.get(f"M{rep}"), prompts.get(f"Q{rep}")
    long_task = asyncio.create_task(run_one(client, srv, l_content, 4, check))
    await asyncio.sleep(z.delay)
    short = await run_one(client, srv, q_content, 4, check)
    long = await long_task
    base = statistics.median(alone)
    return {"ratio": short.ttft / base, "short_ttft_s": short.ttft, "alone_ttft_s": base, "alone_runs_s": alone,
            "long_ttft_s": long.ttft, "short_sent_after_s": short.sent - long.sent}


async def throughput(client: httpx.AsyncClient, srv: Server, prompts: Prompts, z: Sizes, check: Check,
                     rep: int) -> dict[str, Any]:
    """Metric 3: aggregate generated tokens/s of N concurrent streams."""
    contents = [prompts.get(f"T{rep}.{i}") for i in range(z.streams)]
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(run_one(client, srv, c, z.stream_tokens, check) for c in contents))
    wall = max(s.end or t0 for s in streams) - t0
    total = sum(s.generated for s in streams)
    return {"tps": total / wall, "tokens": total, "wall_s": wall,
            "early_stops": sum(s.finish == "stop" for s in streams),
            "ttft_p50_s": statistics.median(s.ttft for s in streams), "retries": sum(s.retries for s in streams)}


async def prefill(client: httpx.AsyncClient, srv: Server, prompts: Prompts, z: Sizes,
                  check: Check) -> dict[str, Any]:
    """Metric 4: prompt tokens ÷ TTFT for one long prompt, max_tokens 1."""
    content = prompts.get("P")
    st = await run_one(client, srv, content, 1, check)
    return {"tps": z.prefill / st.ttft, "ttft_s": st.ttft, "tokens": z.prefill}


async def measure(srv: Server, prompts: Prompts, z: Sizes, check: Check) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        name = SERVERS[srv.key]
        t = time.perf_counter()
        for attempt in range(100):  # warm-up; mlx_lm loads its model on the first request
            try:
                await run_one(client, srv, prompts.get("W"), 8, check)
                break
            except (httpx.HTTPError, RuntimeError):
                if attempt == 99 or srv.proc.poll() is not None:
                    raise
                await asyncio.sleep(0.2)
        print(f"  {name}: warm after {time.perf_counter() - t:.1f} s", flush=True)
        out: dict[str, Any] = {"stall": [], "short_after_long": [], "throughput": []}
        for rep in range(z.repeats):
            r = await stall(client, srv, prompts, z, check, rep)
            out["stall"].append(r)
            print(f"  {name}: stall {rep + 1}/{z.repeats}: worst gap {r['worst_gap_s']:.2f} s during a "
                  f"{r['long_ttft_s']:.2f} s prefill = {r['ratio']:.2f} ({r['stream_chunks_during_prefill']} chunks "
                  f"meanwhile; normal gap {r['normal_gap_ms'] or float('nan'):.1f} ms)", flush=True)
            await asyncio.sleep(0.3)
            r = await short_after_long(client, srv, prompts, z, check, rep)
            out["short_after_long"].append(r)
            print(f"  {name}: short after long {rep + 1}/{z.repeats}: {1000 * r['short_ttft_s']:.0f} ms vs "
                  f"{1000 * r['alone_ttft_s']:.0f} ms alone = {r['ratio']:.2f} (long prompt's TTFT "
                  f"{r['long_ttft_s']:.2f} s)", flush=True)
            await asyncio.sleep(0.3)
        for rep in range(z.repeats):
            r = await throughput(client, srv, prompts, z, check, rep)
            out["throughput"].append(r)
            print(f"  {name}: {z.streams} streams {rep + 1}/{z.repeats}: {r['tokens']} tokens in {r['wall_s']:.2f} s "
                  f"= {r['tps']:.1f} tok/s", flush=True)
            await asyncio.sleep(0.3)
        r = out["prefill"] = await prefill(client, srv, prompts, z, check)
        print(f"  {name}: {z.prefill}-token prefill: {r['ttft_s']:.2f} s = {r['tps']:.0f} tok/s", flush=True)
        return out


def run_server(key: str, path: Path, work: Path, prompts: Prompts, z: Sizes, ctx: int,
               mlx_lm_args: list[str]) -> dict[str, Any]:
    srv = start(key, path, work, ctx, mlx_lm_args)
    check = Check(prompts)
    try:
        wait_up(srv)
        meter = CpuMeter(srv.proc.pid)
        out = asyncio.run(measure(srv, prompts, z, check))
        out["other_cores"] = meter.other_cores()
    finally:
        stop(srv)
    out["prompt_mismatches"], out["usage_reports"] = check.mismatch, check.reported
    out["cached_tokens_max"] = max(check.cached, default=0)
    if not check.reported:
        print(f"  WARNING {SERVERS[key]}: no usage reports, so prompt lengths could not be checked")
    if check.mismatch:
        print(f"  WARNING {SERVERS[key]}: prompt token counts differ from the client's: {check.mismatch[:3]}")
    print(f"  {SERVERS[key]}: other processes used {out['other_cores']:.2f} cores meanwhile", flush=True)
    return out


def paired_throughput(path: Path, work: Path, prompts: Prompts, z: Sizes, ctx: int, pairs: int) -> dict[str, Any]:
    """Metric 3 again, robust to a busy box: both of our servers up at once (an idle one costs nothing) and their
    trials alternated A, B, A, B…, so slow drift in the background load hits both alike. Reports the median of
    the per-pair ratios."""

    async def go(a: Server, b: Server) -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
            out = []
            for srv in (a, b):
                await run_one(client, srv, prompts.get("W"), 8, Check(prompts))
            for i in range(pairs):
                ra = await throughput(client, a, prompts, z, Check(prompts), i % z.repeats)
                await asyncio.sleep(0.3)
                rb = await throughput(client, b, prompts, z, Check(prompts), i % z.repeats)
                await asyncio.sleep(0.3)
                out.append({"chunked_tps": ra["tps"], "unchunked_tps": rb["tps"], "ratio": ra["tps"] / rb["tps"]})
                print(f"  paired {i + 1}/{pairs}: chunked {ra['tps']:.1f} / unchunked {rb['tps']:.1f} tok/s = "
                      f"{out[-1]['ratio']:.3f}", flush=True)
            return out

    a = start("chunked", path, work / "pa", ctx, [])
    b = start("unchunked", path, work / "pb", ctx, [])
    try:
        wait_up(a)
        wait_up(b)
        trials = asyncio.run(go(a, b))
    finally:
        stop(a)
        stop(b)
    return {"pairs": trials, "ratio_median": statistics.median(t["ratio"] for t in trials)}


# ----------------------------------------------------------------------------------------------------- main


def inprocess_prefill(path: Path, prompts: Prompts, n: int) -> float:
    """Seconds mlx_lm takes to prefill an n-token prompt in this process (2048-token steps, like mlx_lm.server)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(str(path))
    ids = mx.array(tok.apply_chat_template([{"role": "user", "content": prompts.make("C", n)}],
                                           add_generation_prompt=True))

    def run(x: mx.array) -> float:
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        for i in range(0, x.size, 2048):
            mx.eval(model(x[None, i:i + 2048], cache=cache), [c.state for c in cache])
        return time.perf_counter() - t

    run(ids[:64])  # compile
    return run(ids)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import mlx.core as mx
    import mlx_lm

    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return {"mlx-server": f"{version('mlx-server')} ({rev})", "mlx_lm": mlx_lm.__version__, "mlx": mx.__version__}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
    def med(key: str, metric: str, name: str) -> Optional[float]:
        r = results.get(key)
        if not r or "error" in r:
            return None
        v = r[metric]
        return statistics.median(x[name] for x in v) if isinstance(v, list) else v[name]

    rows: dict[str, dict[str, Optional[float]]] = {}
    for key in SERVERS:
        rows[key] = {
            "stall_ratio": med(key, "stall", "ratio"), "stall_gap_s": med(key, "stall", "worst_gap_s"),
            "long_ttft_s": med(key, "stall", "long_ttft_s"),
            "short_ratio": med(key, "short_after_long", "ratio"),
            "short_ttft_s": med(key, "short_after_long", "short_ttft_s"),
            "short_alone_s": med(key, "short_after_long", "alone_ttft_s"),
            "stream_tps": med(key, "throughput", "tps"), "prefill_tps": med(key, "prefill", "tps"),
        }
    return rows


def table(rows: dict[str, dict[str, Optional[float]]], z: Sizes) -> str:
    def f(v: Optional[float], fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{1000 * v:.0f}"

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None else a / b

    a, b = rows["chunked"], rows["unchunked"]
    lines = [
        (f"1. stream's worst gap / {z.long}-tok TTFT", [f(r["stall_ratio"], ".2f") for r in rows.values()], "<= 0.1"),
        ("   worst gap, s", [f(r["stall_gap_s"], ".2f") for r in rows.values()], ""),
        (f"   {z.long}-tok prompt TTFT, s", [f(r["long_ttft_s"], ".2f") for r in rows.values()], ""),
        ("2. short TTFT after long / alone", [f(r["short_ratio"], ".2f") for r in rows.values()], "<= 2"),
        ("   short TTFT after long / alone, ms",
         [f"{ms(r['short_ttft_s'])} / {ms(r['short_alone_s'])}" for r in rows.values()], ""),
        (f"3. {z.streams} streams, tok/s", [f(r["stream_tps"], ".1f") for r in rows.values()], ""),
        ("   chunked / unchunked", [f(ratio(a["stream_tps"], b["stream_tps"]), ".3f"), "", ""], ">= 0.95"),
        (f"4. {z.prefill}-tok prefill, tok/s", [f(r["prefill_tps"], ".0f") for r in rows.values()], ""),
        ("   chunked / unchunked", [f(ratio(a["prefill_tps"], b["prefill_tps"]), ".3f"), "", ""], ">= 0.95"),
    ]
    w = max(len(x[0]) for x in lines) + 2
    out = [f"{'metric':<{w}}" + "".join(f"{SERVERS[k]:>16}" for k in SERVERS) + f"{'goal':>10}"]
    out += [f"{name:<{w}}" + "".join(f"{v:>16}" for v in vals) + f"{goal:>10}" for name, vals, goal in lines]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-sized run: shorter prompts and streams, 1 repeat")
    ap.add_argument("--model", default=None, help="an MLX model dir (default: build a random tiny llama)")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model hidden size (4 heads, 2 KV heads)")
    ap.add_argument("--layers", type=int, default=3, help="tiny model layers")
    ap.add_argument("--long", type=int, default=None, help="long prompt tokens, metrics 1-2 (2000; quick 600)")
    ap.add_argument("--short", type=int, default=48, help="short prompt tokens (the tiny model's chat template "
                    "alone is 38)")
    ap.add_argument("--prefill", type=int, default=None, help="metric 4 prompt tokens (8000; quick 1500)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-tokens", type=int, default=None, help="max tokens per stream, metric 3 (128; quick 32)")
    ap.add_argument("--delay", type=float, default=None, help="metric 2: short sent this long after the long (0.3 s; "
                    "quick 0.1 s)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of metrics 1-3 per server (3; quick 1)")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    ap.add_argument("--mlx-lm-args", default="", help="extra flags for mlx_lm server, e.g. "
                    "'--prefill-step-size 256' (default: none, its defaults)")
    ap.add_argument("--pairs", type=int, default=None, help="alternating chunked/unchunked throughput pairs "
                    "(metric 3, paired; 6; quick 2; 0 to skip)")
    ap.add_argument("--json", type=Path, default=Path("bench_latency.json"))
    args = ap.parse_args()
    q = args.quick
    z = Sizes(long=args.long or (600 if q else 2000), short=args.short, stream_prompt=64, streams=args.streams,
              stream_tokens=args.stream_tokens or (32 if q else 128), prefill=args.prefill or (1500 if q else 8000),
              delay=args.delay if args.delay is not None else (0.1 if q else 0.3), lead=16, stall_stream_tokens=0,
              repeats=args.repeats or (1 if q else 3))
    keys = [k for k in args.servers.split(",") if k]
    if unknown := set(keys) - set(SERVERS):
        ap.error(f"unknown servers {sorted(unknown)}; choose from {list(SERVERS)}")

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mlx-bench-latency-"))
    ctx = max(16384, z.prefill + 1024, z.long + 1024)
    z.stall_stream_tokens = ctx - z.short - 64
    if args.model:
        path = Path(args.model).resolve()
        model_desc: dict[str, Any] = {"path": str(path)}
    else:
        from support.tinymodels import build_tiny_model

        path = build_tiny_model(work / "tiny", arch="llama", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=4, num_kv_heads=2, max_position_embeddings=ctx, seed=0)
        model_desc = {"path": str(path), "arch": "llama", "hidden_size": args.hidden, "num_layers": args.layers,
                      "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": ctx, "dtype": "float32"}
    prompts = Prompts(load_tokenizer(path))
    vers = versions()
    print(f"model {model_desc}; logs in {work}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"sizes: {asdict(z)}", flush=True)
    prompts.build_all(z)
    calib = inprocess_prefill(path, prompts, z.long)
    print(f"in-process mlx_lm prefill of the {z.long}-token prompt: {calib:.2f} s ({z.long / calib:.0f} tok/s)",
          flush=True)

    results: dict[str, dict[str, Any]] = {}
    for key in keys:
        print(f"{SERVERS[key]}:", flush=True)
        t = time.perf_counter()
        try:
            results[key] = run_server(key, path, work, prompts, z, ctx, shlex.split(args.mlx_lm_args))
        except Exception as exc:  # one broken server must not hide the others' figures
            traceback.print_exc()
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        results[key]["elapsed_s"] = time.perf_counter() - t
        print(f"  {SERVERS[key]}: {results[key]['elapsed_s']:.0f} s", flush=True)

    paired: Optional[dict[str, Any]] = None
    pairs = args.pairs if args.pairs is not None else (2 if q else 6)
    if pairs and {"chunked", "unchunked"} <= set(keys):
        print("metric 3, paired (both of our servers up, trials alternated):", flush=True)
        for sub in ("pa", "pb"):
            (work / sub).mkdir(exist_ok=True)
        paired = paired_throughput(path, work, prompts, z, ctx, pairs)

    rows = summarize(results)
    print()
    print(table(rows, z))
    if paired is not None:
        print(f"3'. {z.streams} streams, chunked / unchunked, median of {pairs} alternated pairs: "
              f"{paired['ratio_median']:.3f} (goal >= 0.95)")
    a, b = rows["chunked"], rows["unchunked"]
    goals = {
        "stall_ratio_chunked": a["stall_ratio"], "short_ratio_chunked": a["short_ratio"],
        "stream_tps_chunked_over_unchunked": (a["stream_tps"] / b["stream_tps"]
                                              if a["stream_tps"] and b["stream_tps"] else None),
        "stream_tps_chunked_over_unchunked_paired": paired["ratio_median"] if paired else None,
        "prefill_tps_chunked_over_unchunked": (a["prefill_tps"] / b["prefill_tps"]
                                               if a["prefill_tps"] and b["prefill_tps"] else None),
    }
    elapsed = time.perf_counter() - t_start
    print(f"\n(medians of {z.repeats} run(s) for metrics 1-3; total {elapsed:.0f} s; JSON in {args.json})")
    args.json.write_text(json.dumps({
        "model": model_desc, "sizes": asdict(z), "versions": vers, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "inprocess_prefill_s": calib, "mlx_lm_args": args.mlx_lm_args, "order": "sequential: " + ", ".join(keys),
        "summary": rows, "goals": goals,
        "goal_targets": {"stall_ratio": "<= 0.1", "short_ratio": "<= 2", "stream_tps_ratio": ">= 0.95",
                         "prefill_tps_ratio": ">= 0.95"},
        "servers": results, "elapsed_s": elapsed}, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
