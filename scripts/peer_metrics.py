"""The measurements of scripts/bench_peers.py: one server (ours or a peer) at a time, the same requests for all.

Every function here takes a `Target` (a running server: its URL, the `model` its requests name, its process) and
returns plain dicts; bench_peers.py starts and stops the servers, rotates the rounds and prints the ratios.
The mixed-load metrics are scripts/bench_latency.py's own (stall, short_after_long), so the figures compare with
the docs' earlier tables.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import bench_latency as lat
import httpx
import psutil


@dataclass
class Target:
    """A running server, shaped like bench_latency.Server (its stall / short_after_long take it)."""

    key: str
    url: str
    model: str
    proc: Any  # subprocess.Popen
    log: Path
    ollama: bool = False  # ours: also measured on /api/chat


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Meter:
    """Samples the server's process tree (mlx-openai-server runs its model in a child process) every 50 ms: RSS
    peaks, and the CPU the rest of the machine used meanwhile (a colleague's tests on 2 cores move every figure)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.me = psutil.Process()
        self.stop = threading.Event()
        self.peak = 0
        self.window_peak = 0  # reset by window()
        self.cpu: dict[int, float] = {}  # pid -> last cpu seconds seen (children counted while they live)
        self.t0 = time.perf_counter()
        self.total0 = self._machine()
        self.own0 = self._own()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + t.nice + t.irq + t.softirq

    def _own(self) -> float:
        for p in [self.me, *tree(self.pid)]:
            try:
                c = p.cpu_times()
                self.cpu[p.pid] = c.user + c.system
            except psutil.NoSuchProcess:
                pass
        return sum(self.cpu.values())

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            rss = 0
            for p in tree(self.pid):
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, rss)
            self.window_peak = max(self.window_peak, rss)
            self._own()

    def window(self) -> None:
        self.window_peak = 0

    def close(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        wall = time.perf_counter() - self.t0
        other = max(0.0, (self._machine() - self.total0) - (self._own() - self.own0))
        return {"peak_rss_mb": self.peak / 1e6, "other_cores": other / wall}


@dataclass
class Run:
    """One streamed request: generated text, chunk times, the server's own counts where it reports them."""

    sent: float
    first: Optional[float] = None
    end: float = 0.0
    text: list[str] = field(default_factory=list)
    completion_tokens: Optional[int] = None
    prompt_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    chunks: int = 0

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.sent

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.chunks


async def _send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
    for attempt in range(6):
        try:
            return await client.send(client.build_request("POST", url, json=body), stream=True)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            # mlx_lm.server listens with a backlog of 5: a burst of 8 connects can be reset; the TTFT keeps the cost
            if attempt == 5:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def _chat(
    client: httpx.AsyncClient,
    t: Target,
    path: str,
    body: dict[str, Any],
    data: Callable[[str], Optional[str]],
    read: Callable[[Run, dict[str, Any]], None],
) -> Run:
    """One streamed request: each line's JSON (`data` picks it out of the line, None to skip) goes to `read`."""
    run = Run(time.perf_counter())
    r = await _send(client, f"{t.url}{path}", body)
    try:
        if r.status_code != 200:
            raise RuntimeError(f"{t.key} {path}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            text = data(line.strip())
            if text is None:
                continue
            obj = json.loads(text)
            if "error" in obj:
                raise RuntimeError(f"{t.key}: {obj['error']}")
            read(run, obj)
    finally:
        await r.aclose()
    run.end = time.perf_counter()
    return run


def _piece(run: Run, piece: Optional[str]) -> None:
    if piece:
        run.first = run.first or time.perf_counter()
        run.text.append(piece)
        run.chunks += 1


def _sse_data(line: str) -> Optional[str]:
    return line[5:] if line.startswith("data:") and line[5:].strip() != "[DONE]" else None


def _read_openai(run: Run, obj: dict[str, Any]) -> None:
    for choice in obj.get("choices") or []:
        _piece(run, (choice.get("delta") or {}).get("content"))
    if u := obj.get("usage"):
        run.completion_tokens, run.prompt_tokens = u.get("completion_tokens"), u.get("prompt_tokens")
        run.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens")


def _read_ollama(run: Run, obj: dict[str, Any]) -> None:
    _piece(run, (obj.get("message") or {}).get("content"))
    if obj.get("done"):
        run.completion_tokens, run.prompt_tokens = obj.get("eval_count"), obj.get("prompt_eval_count")


async def openai_chat(
    client: httpx.AsyncClient, t: Target, messages: list[dict[str, str]], max_tokens: int
) -> Run:
    body = {
        "model": t.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return await _chat(client, t, "/v1/chat/completions", body, _sse_data, _read_openai)


async def ollama_chat(
    client: httpx.AsyncClient, t: Target, messages: list[dict[str, str]], max_tokens: int
) -> Run:
    body = {
        "model": t.model,
        "messages": messages,
        "stream": True,
        "options": {"temperature": 0, "num_predict": max_tokens},
    }
    return await _chat(client, t, "/api/chat", body, lambda line: line or None, _read_ollama)


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


async def throughput(
    client: httpx.AsyncClient, t: Target, prompts: lat.Prompts, tag: str, streams: int, max_tokens: int, size: int,
    *, ollama: bool = False,
) -> dict[str, Any]:
    """`streams` concurrent greedy streams of `max_tokens`, each its own `size`-token prompt: generated tokens (the
    server's count where reported) ÷ wall time from the first send to the last end."""
    chat = ollama_chat if ollama else openai_chat
    contents = [prompts.make(f"{tag}.{i}", size) for i in range(streams)]
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(chat(client, t, user(c), max_tokens) for c in contents))
    wall = max(r.end for r in runs) - t0
    tokens = sum(r.tokens for r in runs)
    return {
        "tps": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50_s": statistics.median(r.ttft for r in runs),
        "texts": ["".join(r.text) for r in runs],
    }


async def followup(
    client: httpx.AsyncClient, t: Target, prompts: lat.Prompts, tag: str, size: int, first_tokens: int
) -> dict[str, Any]:
    """An agent's second turn: a `size`-token first turn answered with `first_tokens` tokens, then the whole
    conversation again plus a short question, max_tokens 1. The second turn's time to its (only) token: what a
    prefix cache saves. Its `cached_tokens` where the server reports them."""
    first = prompts.make(tag, size)
    one = await openai_chat(client, t, user(first), first_tokens)
    msgs = [*user(first), {"role": "assistant", "content": "".join(one.text)}, *user("And then what happened next?")]
    two = await openai_chat(client, t, msgs, 1)
    return {
        "ttft_s": two.ttft,
        "prompt_tokens": two.prompt_tokens,
        "cached_tokens": two.cached_tokens,
        "first_turn_s": one.end - one.sent,
    }


async def warm(client: httpx.AsyncClient, t: Target, prompts: lat.Prompts, timeout: float = 600) -> float:
    """The first request (mlx-omni-server and mlx_lm.server load the model on it), retried until it answers."""
    start = time.perf_counter()
    while True:
        try:
            await openai_chat(client, t, user(prompts.make("W", 48)), 8)
            if t.ollama:
                await ollama_chat(client, t, user(prompts.make("W", 48)), 8)
            return time.perf_counter() - start
        except (httpx.HTTPError, RuntimeError):
            if time.perf_counter() - start > timeout or t.proc.poll() is not None:
                raise
            await asyncio.sleep(0.25)


@dataclass
class Plan:
    levels: tuple[int, ...] = (1, 4, 8)
    stream_tokens: int = 128
    stream_prompt: int = 64
    long: int = 1500
    short: int = 48
    delay: float = 0.3
    followups: int = 4
    followup_size: int = 1500
    followup_first_tokens: int = 16
    ctx: int = 8192


async def measure_decode(t: Target, prompts: lat.Prompts, plan: Plan, rnd: int, say: Any) -> dict[str, Any]:
    """Phase 1, on the decode model: aggregate tok/s at every level (ours: on both routes), peak RSS over the
    requests every server gets (`peak_rss_mb`) and over the whole phase (`peak_rss_all_mb`)."""
    meter = Meter(t.proc.pid)
    out: dict[str, Any] = {}
    same: Optional[float] = None  # peak RSS once the requests every server gets are done
    try:
        async with client() as c:
            out["warm_s"] = await warm(c, t, prompts)
            for route in ["openai", "ollama"] if t.ollama else ["openai"]:
                for n in plan.levels:
                    if n == max(plan.levels):
                        meter.window()
                    # Each route its own prompts: the second would otherwise find the first's in the prompt cache.
                    r = await throughput(
                        c, t, prompts, f"T{rnd}.{route}.{n}", n, plan.stream_tokens, plan.stream_prompt,
                        ollama=route == "ollama",
                    )
                    out[f"tps_{route}_{n}"] = r
                    say(f"{route} {n} stream(s): {r['tokens']} tokens in {r['wall_s']:.2f} s = {r['tps']:.1f} tok/s")
                    if n == max(plan.levels) and route == "openai":
                        out["rss_streams_mb"] = meter.window_peak / 1e6
                    await asyncio.sleep(0.3)
                if route == "openai":
                    # The peers' whole decode phase; ours then serves the Ollama route's streams too, whose stored
                    # prompt caches would otherwise count against us alone.
                    same = meter.peak / 1e6
    finally:
        closed = meter.close()
        out["other_cores"] = closed["other_cores"]
        out["peak_rss_all_mb"] = closed["peak_rss_mb"]
        out["peak_rss_mb"] = same if same is not None else closed["peak_rss_mb"]
    return out


async def measure_prefill(t: Target, prompts: lat.Prompts, plan: Plan, rnd: int, say: Any) -> dict[str, Any]:
    """Phase 2, on the prefill model: mixed load (stall, short behind long) and the follow-up turn."""
    meter = Meter(t.proc.pid)
    out: dict[str, Any] = {}
    try:
        async with client() as c:
            out["warm_s"] = await warm(c, t, prompts)
            z = lat.Sizes(
                long=plan.long, short=plan.short, stream_prompt=plan.stream_prompt, streams=8,
                stream_tokens=plan.stream_tokens, prefill=plan.long, delay=plan.delay, lead=16,
                stall_stream_tokens=plan.ctx - plan.short - 64, repeats=1,
            )
            for tag, n in ((f"S{rnd}", plan.short), (f"L{rnd}", plan.long), (f"M{rnd}", plan.long),
                           (f"Q{rnd}", plan.short), *((f"A{rnd}.{i}", plan.short) for i in range(3))):
                prompts.by_tag[tag] = prompts.make(tag, n)
            check = lat.Check(prompts)
            s = await lat.stall(c, t, prompts, z, check, rnd)  # type: ignore[arg-type]
            out["stall"] = s
            say(f"stall: worst gap {s['worst_gap_s']:.2f} s in a {s['long_ttft_s']:.2f} s prefill = {s['ratio']:.2f}")
            await asyncio.sleep(0.3)
            q = await lat.short_after_long(c, t, prompts, z, check, rnd)  # type: ignore[arg-type]
            out["short"] = q
            say(f"short behind long: {1000 * q['short_ttft_s']:.0f} ms vs {1000 * q['alone_ttft_s']:.0f} ms alone "
                f"= {q['ratio']:.1f}x")
            out["prompt_mismatches"] = check.mismatch
            fus = []
            for k in range(plan.followups):
                await asyncio.sleep(0.2)
                fus.append(await followup(c, t, prompts, f"F{rnd}.{k}", plan.followup_size,
                                          plan.followup_first_tokens))
            out["followup"] = fus
            say("follow-up turn: " + ", ".join(f"{1000 * f['ttft_s']:.0f} ms" for f in fus)
                + f" (prompt {fus[-1]['prompt_tokens']}, cached {fus[-1]['cached_tokens']})")
    finally:
        out.update(meter.close())
    return out


def client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits)


async def paired_followups(
    a: Target, b: Target, prompts: lat.Prompts, plan: Plan, pairs: int, say: Any
) -> dict[str, Any]:
    """The follow-up turn again, robust to a busy machine: both servers up at once (an idle one costs nothing) and
    their turns alternated a, b, b, a, … so drift in the background load hits both alike. Each server answers one
    `followup_size`-token first turn; then every pair asks both the same new question after that conversation
    (so only the question is new to the prefix cache), max_tokens 1. Per-pair ratio a ÷ b, and its median."""
    async with client() as c:
        for t in (a, b):
            await warm(c, t, prompts)
        first = prompts.make("PF", plan.followup_size)
        history = {}
        for t in (a, b):
            one = await openai_chat(c, t, user(first), plan.followup_first_tokens)
            history[t.key] = [*user(first), {"role": "assistant", "content": "".join(one.text)}]
        times: dict[str, list[float]] = {a.key: [], b.key: []}
        usage: dict[str, Any] = {}
        for i in range(pairs + 1):  # the first pair warms the follow-up path and is not counted
            question = prompts.make(f"PQ{i}", plan.short)
            for t in (a, b) if i % 2 == 0 else (b, a):
                await asyncio.sleep(0.05)
                run = await openai_chat(c, t, [*history[t.key], *user(question)], 1)
                if i:
                    times[t.key].append(run.ttft)
                usage[t.key] = {"prompt_tokens": run.prompt_tokens, "cached_tokens": run.cached_tokens}
    ratios = [x / y for x, y in zip(times[a.key], times[b.key], strict=True)]
    out = {
        "ratio_median": statistics.median(ratios),
        f"{a.key}_ms": 1000 * statistics.median(times[a.key]),
        f"{b.key}_ms": 1000 * statistics.median(times[b.key]),
        "ratios": ratios,
        "usage": usage,
    }
    say(f"paired follow-up, {pairs} pairs: {a.key} {out[f'{a.key}_ms']:.0f} ms, {b.key} {out[f'{b.key}_ms']:.0f} ms, "
        f"per-pair median {a.key} ÷ {b.key} = {out['ratio_median']:.2f} (usage {usage})")
    return out


async def paired_throughput(
    a: Target, b: Target, prompts: lat.Prompts, plan: Plan, pairs: int, levels: tuple[int, ...], say: Any
) -> dict[str, Any]:
    """Aggregate tok/s again, paired as the follow-up turn is: both servers up, bursts of `n` streams alternated
    a, b, b, a, … (each burst its own new prompts on both, so neither finds them cached), per-pair ratio a ÷ b of
    tok/s and its median, per level. Where `a` speaks Ollama, its /api/chat 1-stream burst is paired with b's
    /v1/chat/completions too (the route Ollama clients use against the peer's only one)."""
    runs = [(n, "openai") for n in levels] + ([(1, "ollama")] if a.ollama else [])
    out: dict[str, Any] = {}
    async with client() as c:
        for t in (a, b):
            await warm(c, t, prompts)
        for n, route in runs:
            tps: dict[str, list[float]] = {a.key: [], b.key: []}
            for i in range(pairs + 1):  # the first pair warms this level's path and is not counted
                for t in (a, b) if i % 2 == 0 else (b, a):
                    await asyncio.sleep(0.3)
                    r = await throughput(c, t, prompts, f"PT.{route}.{n}.{i}.{t.key}", n, plan.stream_tokens,
                                         plan.stream_prompt, ollama=route == "ollama" and t is a)
                    if i:
                        tps[t.key].append(r["tps"])
            ratios = [x / y for x, y in zip(tps[a.key], tps[b.key], strict=True)]
            key = f"{route}_{n}"
            out[key] = {"ratio_median": statistics.median(ratios), "ratios": ratios,
                        f"{a.key}_tps": statistics.median(tps[a.key]), f"{b.key}_tps": statistics.median(tps[b.key])}
            say(f"paired tok/s, {n} stream(s), {a.key} on {route}: {a.key} {out[key][f'{a.key}_tps']:.1f}, "
                f"{b.key} {out[key][f'{b.key}_tps']:.1f}, per-pair median {a.key} ÷ {b.key} = "
                f"{out[key]['ratio_median']:.2f} ({', '.join(f'{x:.2f}' for x in ratios)})")
    return out
