#!/usr/bin/env python3
"""Vision requests: mlx-server vs `python -m mlx_vlm.server` (issue 21), same tiny VLM, same images, same run.

The model is the suite's random tiny Qwen2-VL (tests/support/tinyvlm.py `build_qwen2_vl`: hidden 64, 2 text and 2
vision layers, float32), with its image processor's pixel budget raised to --image-size² so that a
--image-size × --image-size picture (`sample_image`, 224 × 224 by default) keeps its size: 28 × 28 patches of 8 px,
merged 2 × 2 into 196 image tokens (the builder's own budget would shrink it to 16). Every request is
OpenAI `/v1/chat/completions`, streaming, greedy (temperature 0), one user turn of a short text part plus one
`image_url` part carrying a PNG data URL; each request has its own picture unless said otherwise, and picture N is
the same bytes for both servers, so both prefill the same tokens (checked against their `usage.prompt_tokens`) and,
on the same weights, should answer the same text (compared, reported).

The servers run one at a time, each a fresh process per round (--rounds, default 4; rounds alternate which server
goes first), never both at work: ours as `python -m mlx_server --config models.yaml serve` (its defaults:
prefill_slice 0.05 s, prompt and image-feature caches on), the peer as `python -m mlx_vlm.server --model DIR`
(its defaults: continuous batching, a 20-entry vision-feature cache, APC prefix cache off — mlx-vlm 0.7.10 only
turns it on with APC_ENABLED=1) from a venv of its own, built here once (--peer-venv, default
~/.cache/mlx-server/bench-mlxvlm-venv: `pip install mlx-vlm==0.7.10 mlx[cpu]`; what that took is stored in the venv
and reported). Per server process, after warm-up requests (a single and a 4-wide batch, their own pictures):

  1. TTFT: --ttft-runs single-image requests one after the other (max tokens 8): send to the first content chunk;
  2. throughput: at each level N of --levels (1, 4, 8), N concurrent image requests (max tokens --tokens, 32):
     generated tokens (the servers' usage reports) ÷ wall time from the first send to the last stream's end,
     which includes every image's encode and prefill; also the median TTFT at that level;
  3. follow-up turn: turn 1 (a picture + a question, max tokens 16), then turn 2 = the same picture in the history +
     turn 1's answer + a new question (max tokens 8): its TTFT ÷ turn 1's, and the server's cached_tokens. The peer
     is measured the same way: with APC off it prefills the whole history again, and its vision-feature cache does
     not spare the tower either (mlx-vlm 0.7.10's qwen2_vl model does not read it);
  4. encode stall: a text-only stream (no image, logprobs on so each chunk says how many tokens it carries) is read
     in a process of its own (this client's JSON and base64 work must not show as gaps) and decodes alone for
     --alone s, then 4 image requests are sent at once: the stream's longest gap between chunks while they are
     encoded and prefilled (from their send to the last one's first token) vs its longest and median gaps alone.
     Ours encodes at most one image per prefill slice between decode steps; the peer runs each new request's
     vision tower and prefill before its next decode step.

Medians over rounds (metric 1: over every request of every round). "other cores" is CPU used by processes other
than this client and the server while the server ran: on a shared 2-core box it moves every figure. Timings are
printed, never asserted.

Before the servers, one picture's vision tower is timed in this process (mlx-vlm's Qwen2-VL `vision_tower` on its
pixel values, median of 3 pictures after one warm-up): the unit metric 4's gaps are made of.

A first image request to our server, started plainly, is checked before the rounds: a Qwen-VL processor loaded
through transformers' AutoProcessor before `mlx_vlm.models.qwen2_vl` is imported (the import registers mlx-vlm's
numpy processor) is transformers' torch-backed one, and every image request then answers 500 (seen on 2026-12-07
with a working tree from before VisionProcessor.load imported the family's module).
--ours-preimport auto (default) then reports the error and runs our server with that module imported first
(`python -c "import mlx_vlm.models.qwen2_vl; runpy…mlx_server"`) in every round; `yes` always does, `no` never.

    .venv/bin/python scripts/bench_vision.py                       # full run, ~2 min on 2 CPU cores (plus
                                                                   # the peer venv's one-off build, ~80 s)
    .venv/bin/python scripts/bench_vision.py --quick               # smoke-sized, ~45 s
    .venv/bin/python scripts/bench_vision.py --rounds 5 --image-size 336 --json vision.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import yaml
from benchserve import stop_server, wait_healthy

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-VLM builder
from bench import free_port  # noqa: E402
from bench_throughput import CpuMeter  # noqa: E402

SERVERS = {"ours": "mlx-server", "peer": "mlx_vlm.server"}
PEER_VERSION = "0.7.10"
DEFAULT_VENV = Path.home() / ".cache" / "mlx-server" / "bench-mlxvlm-venv"
BUILD_INFO = ".bench-build.json"  # in the peer venv: what building it took
PREIMPORT = "mlx_vlm.models.qwen2_vl"
QUESTION = "Describe the picture."
FOLLOW_UP = "What colour is in the top left corner?"
STREAM_TEXT = "Count from one to one hundred in words."


# ----------------------------------------------------------------------------------------------------- model, images


def build_model(work: Path, image_size: int) -> tuple[Path, dict[str, Any]]:
    """The tiny Qwen2-VL, with the processors' pixel budget raised so an image_size² picture keeps its size."""
    from support.tinyvlm import build_qwen2_vl

    path = build_qwen2_vl(work / "tinyvlm", seed=0)
    pixels = image_size * image_size
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["max_pixels"] = max(cfg["max_pixels"], pixels)
        cfg["size"]["longest_edge"] = max(cfg["size"]["longest_edge"], pixels)
        (path / name).write_text(json.dumps(cfg, indent=2))
    config = json.loads((path / "config.json").read_text())
    tokens = (image_size // 16) ** 2  # 8-px patches merged 2 × 2 (image_size a multiple of 16)
    desc = {
        "builder": "tests/support/tinyvlm.py build_qwen2_vl(seed=0)",
        "model_type": config["model_type"],
        "hidden_size": config["hidden_size"],
        "text_layers": config["num_hidden_layers"],
        "vision_depth": config["vision_config"]["depth"],
        "dtype": "float32",
        "image": f"{image_size}x{image_size} PNG (sample_image)",
        "image_tokens": tokens,
        "max_pixels": pixels,
    }
    return path, desc


class Images:
    """PNG data URLs of `sample_image(seed)`, one distinct picture per tag, the same bytes for both servers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.urls: dict[str, str] = {}
        self.seeds: dict[str, int] = {}

    def url(self, tag: str) -> str:
        if tag not in self.urls:
            from support.tinyvlm import sample_image

            seed = self.seeds[tag] = len(self.seeds) + 1
            buf = io.BytesIO()
            sample_image(seed, size=(self.size, self.size)).save(buf, "PNG")
            self.urls[tag] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return self.urls[tag]


def image_message(images: Images, tag: str, text: str = QUESTION) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": images.url(tag)}}],
    }


# ----------------------------------------------------------------------------------------------------- peer venv


def tower_ms(model_dir: Path, images: Images, runs: int = 3) -> dict[str, Any]:
    """One picture through the vision tower in this process (mlx-vlm's model, MLX's CPU backend), ms."""
    import mlx.core as mx
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import load, prepare_inputs

    from support.tinyvlm import sample_image

    model, proc = load(str(model_dir))
    prompt = apply_chat_template(proc, model.config, QUESTION, num_images=1)
    times = []
    for i in range(runs + 1):
        inputs = prepare_inputs(
            proc, images=[sample_image(10_000 + i, size=(images.size, images.size))], prompts=prompt
        )
        t = time.monotonic()
        mx.eval(model.vision_tower(inputs["pixel_values"], inputs["image_grid_thw"], output_hidden_states=False))
        times.append(1000 * (time.monotonic() - t))
    return {
        "median_ms": statistics.median(times[1:]),
        "runs_ms": times[1:],
        "warmup_ms": times[0],
        "patches": int(inputs["pixel_values"].shape[0]),
    }


def ensure_peer_venv(venv: Path) -> tuple[Path, dict[str, Any]]:
    """The venv's python, building the venv if it cannot import mlx_vlm.server; what building it took."""
    python = venv / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import mlx_vlm, mlx_vlm.server, fastapi, uvicorn; "
        f"assert mlx_vlm.__version__ == {PEER_VERSION!r}, mlx_vlm.__version__",
    ]
    info_file = venv / BUILD_INFO
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        return python, {**info, "built_now": False, "venv": str(venv)}
    mlx = "mlx[cpu]" if platform.system() == "Linux" else "mlx"
    reqs = [f"mlx-vlm=={PEER_VERSION}", mlx]
    shutil.rmtree(venv, ignore_errors=True)
    print(f"building the peer venv {venv}: pip install {' '.join(reqs)}", flush=True)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *reqs], check=True)
    seconds = time.monotonic() - start
    done = subprocess.run(check, capture_output=True, text=True)
    if done.returncode != 0:  # mlx_vlm.server needs more than mlx-vlm's own requirements: say what
        raise RuntimeError(
            f"the peer venv cannot import mlx_vlm.server after `pip install {' '.join(reqs)}`:\n{done.stderr[-2000:]}"
        )
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True).stdout.split()[0])
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    keep = (
        "mlx",
        "mlx-cpu",
        "mlx-vlm",
        "mlx-lm",
        "mlx-audio",
        "fastapi",
        "uvicorn",
        "transformers",
        "pillow",
        "numpy",
        "torch",
        "opencv-python",
        "datasets",
    )
    pkgs = {n: v for n, _, v in (x.partition("==") for x in freeze) if n.lower() in keep}
    info = {
        "requirements": reqs,
        "install_s": round(seconds, 1),
        "size_bytes": size,
        "packages": pkgs,
        "packages_total": len(freeze),
        "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
    }
    info_file.write_text(json.dumps(info, indent=2))
    return python, {**info, "built_now": True, "venv": str(venv)}


# ----------------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    key: str
    url: str
    model: str  # the "model" field requests carry
    proc: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]


def start(key: str, model_dir: Path, work: Path, peer_python: Optional[Path], preimport: bool) -> Server:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{key}.log"
    if key == "ours":
        cfg = work / "models.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "server": {"port": port, "memory_budget": "8GB", "cache_dir": str(work / "cache")},
                    "models": {"vlm": {"source": str(model_dir), "keep_alive": -1}},
                }
            )
        )
        argv = ["--config", str(cfg), "--log-level", "warning", "serve"]
        if preimport:
            cmd = [
                sys.executable,
                "-c",
                f"import runpy, sys, {PREIMPORT}; sys.argv = ['mlx_server', *sys.argv[1:]]; "
                "runpy.run_module('mlx_server', run_name='__main__')",
                *argv,
            ]
        else:
            cmd = [sys.executable, "-m", "mlx_server", *argv]
        model = "vlm"
    else:
        assert peer_python is not None
        cmd = [
            str(peer_python),
            "-m",
            "mlx_vlm.server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ]
        model = str(model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
    srv = Server(key, f"http://127.0.0.1:{port}", model, proc, log, cmd)
    if wait_healthy(srv.url, proc, 180):
        return srv
    stop(srv)
    raise RuntimeError(f"{SERVERS[key]} did not come up (exit code {proc.poll()}); see {log}")


def stop(srv: Server) -> None:
    stop_server(srv.proc)


# ----------------------------------------------------------------------------------------------------- client


class HTTPFailure(RuntimeError):
    def __init__(self, server: str, status: int, body: str) -> None:
        super().__init__(f"{server}: HTTP {status}: {body[:600]}")
        self.status, self.body = status, body


@dataclass
class Stream:
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of every chunk with content
    text: str = ""
    end: Optional[float] = None
    prompt_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish: Optional[str] = None

    @property
    def ttft(self) -> float:
        first = self.times[0] if self.times else self.end
        if first is None:
            raise RuntimeError("stream has no first token")
        return first - self.sent

    @property
    def generated(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.times)


def body_for(srv: Server, messages: list[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": srv.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def chat(client: httpx.AsyncClient, srv: Server, messages: list[dict[str, Any]], max_tokens: int) -> Stream:
    """One streaming /v1/chat/completions request; chunk arrival times, text and usage."""
    st = Stream()
    body = body_for(srv, messages, max_tokens)
    st.sent = time.monotonic()
    async with client.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise HTTPFailure(SERVERS[srv.key], r.status_code, (await r.aread()).decode(errors="replace"))
        async for line in r.aiter_lines():
            line = line.strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            now = time.monotonic()
            if "error" in obj:
                raise RuntimeError(f"{SERVERS[srv.key]}: {obj['error']}")
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    st.times.append(now)
                    st.text += content
                st.finish = choice.get("finish_reason") or st.finish
            if obj.get("usage"):
                u = obj["usage"]
                st.prompt_tokens, st.completion_tokens = u.get("prompt_tokens"), u.get("completion_tokens")
                st.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    st.end = time.monotonic()
    return st


def _read_stream(url: str, body: dict[str, Any], out: Any, stop_ev: Any) -> None:
    """The text stream's reader process: (monotonic time, tokens in the chunk) per chunk; None at the stream's end."""
    with httpx.Client(timeout=None) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            out.put(("error", f"HTTP {r.status_code}: {r.read()[:300]!r}"))
            return
        for line in r.iter_lines():
            if stop_ev.is_set():
                return  # closing the response cancels the request
            if not line.startswith("data: "):
                continue
            if line.strip() == "data: [DONE]":
                out.put(None)
                return
            now = time.monotonic()
            choices = json.loads(line[6:]).get("choices") or []
            if not choices:
                continue
            c = choices[0]
            n = len(((c.get("logprobs") or {}).get("content")) or [])
            if n or (c.get("delta") or {}).get("content"):
                out.put((now, max(n, 1)))


class TextStream:
    """A text-only greedy stream read in a process of its own (CLOCK_MONOTONIC is one clock for both processes)."""

    def __init__(self, srv: Server, max_tokens: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue, self._stop = ctx.Queue(), ctx.Event()
        body = body_for(srv, [{"role": "user", "content": STREAM_TEXT}], max_tokens, logprobs=True)
        self._proc = ctx.Process(target=_read_stream, args=(srv.url, body, self._queue, self._stop), daemon=True)
        self._times: list[float] = []
        self.tokens: list[int] = []
        self.ended_early = False
        self.error: Optional[str] = None

    def start(self) -> None:
        self._proc.start()

    @property
    def times(self) -> list[float]:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return self._times
            if item is None:
                self.ended_early = True
            elif item[0] == "error":
                self.error = item[1]
            else:
                self._times.append(item[0])
                self.tokens.append(item[1])

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self.times  # noqa: B018 - collect what arrived before the stop

    def gaps(self, start: float, end: float) -> list[tuple[float, int]]:
        """(gap, tokens in the later chunk) for every interval between chunks that overlaps [start, end]."""
        t = self.times
        return [(b - a, k) for a, b, k in zip(t, t[1:], self.tokens[1:], strict=False) if b >= start and a <= end]


# ----------------------------------------------------------------------------------------------------- metrics


@dataclass
class Sizes:
    rounds: int
    ttft_runs: int
    levels: list[int]
    tokens: int
    alone: float
    stall_images: int
    stream_tokens: int


class Check:
    """Every image request: HTTP 200 (else it raises), text, and the prompt length both servers should agree on."""

    def __init__(self) -> None:
        self.prompt_tokens: dict[str, set[int]] = {}  # request kind -> prompt token counts seen
        self.empty: list[str] = []
        self.answers: dict[str, str] = {}  # image tag -> greedy text (metric 1's requests)

    def __call__(self, kind: str, st: Stream) -> Stream:
        if st.prompt_tokens is not None:
            self.prompt_tokens.setdefault(kind, set()).add(st.prompt_tokens)
        if not st.text:
            self.empty.append(f"{kind} (finish {st.finish}, {st.completion_tokens} tokens)")
        return st


async def warm_up(client: httpx.AsyncClient, srv: Server, images: Images, check: Check, rnd: int) -> float:
    t = time.monotonic()
    check("warm", await chat(client, srv, [image_message(images, f"warm.{rnd}")], 8))
    await asyncio.gather(*(chat(client, srv, [image_message(images, f"warmb.{rnd}.{i}")], 8) for i in range(4)))
    return time.monotonic() - t


async def ttft_single(
    client: httpx.AsyncClient, srv: Server, images: Images, z: Sizes, check: Check, rnd: int
) -> list[dict[str, Any]]:
    out = []
    for i in range(z.ttft_runs):
        tag = f"ttft.{rnd}.{i}"
        st = check("single", await chat(client, srv, [image_message(images, tag)], 8))
        check.answers[tag] = st.text
        out.append({"ttft_s": st.ttft, "prompt_tokens": st.prompt_tokens, "cached_tokens": st.cached_tokens})
        await asyncio.sleep(0.1)
    return out


async def concurrent(
    client: httpx.AsyncClient, srv: Server, images: Images, z: Sizes, check: Check, rnd: int, n: int
) -> dict[str, Any]:
    t0 = time.monotonic()
    streams = await asyncio.gather(
        *(chat(client, srv, [image_message(images, f"conc{n}.{rnd}.{i}")], z.tokens) for i in range(n))
    )
    wall = max(s.end or t0 for s in streams) - t0
    for s in streams:
        check("single", s)
    total = sum(s.generated for s in streams)
    decode = [
        (s.end - s.times[0]) / (s.generated - 1) for s in streams if s.end is not None and s.times and s.generated > 1
    ]
    return {
        "tps": total / wall,
        "tokens": total,
        "wall_s": wall,
        "decode_ms_per_token_p50": 1000 * statistics.median(decode) if decode else None,
        "ttft_p50_s": statistics.median(s.ttft for s in streams),
        "ttft_max_s": max(s.ttft for s in streams),
        "early_stops": sum(s.finish == "stop" for s in streams),
    }


async def follow_up(client: httpx.AsyncClient, srv: Server, images: Images, check: Check, rnd: int) -> dict[str, Any]:
    tag = f"turn.{rnd}"
    first_msgs = [image_message(images, tag)]
    first = check("turn1", await chat(client, srv, first_msgs, 16))
    await asyncio.sleep(0.2)
    msgs = [*first_msgs, {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
    second = check("turn2", await chat(client, srv, msgs, 8))
    return {
        "turn1_ttft_s": first.ttft,
        "turn2_ttft_s": second.ttft,
        "ratio": second.ttft / first.ttft,
        "turn1_prompt_tokens": first.prompt_tokens,
        "turn2_prompt_tokens": second.prompt_tokens,
        "turn2_cached_tokens": second.cached_tokens,
    }


async def encode_stall(
    client: httpx.AsyncClient, srv: Server, images: Images, z: Sizes, check: Check, rnd: int
) -> dict[str, Any]:
    ts = TextStream(srv, z.stream_tokens)
    ts.start()
    try:
        deadline = time.monotonic() + 60
        while len(ts.times) < 5:
            if ts.error or ts.ended_early or time.monotonic() > deadline:
                raise RuntimeError(f"text stream did not start: {ts.error or 'ended' if ts.ended_early else 'timeout'}")
            await asyncio.sleep(0.02)
        a0 = ts.times[-1]
        await asyncio.sleep(z.alone)
        t_alone = list(ts.times)
        alone = [b - a for a, b in zip(t_alone, t_alone[1:], strict=False) if a >= a0]
        alone_tokens = sum(k for t, k in zip(t_alone, ts.tokens, strict=False) if t > a0)
        for i in range(z.stall_images):
            images.url(f"stall.{rnd}.{i}")  # PNG-encoded before the window opens
        streams = await asyncio.gather(
            *(chat(client, srv, [image_message(images, f"stall.{rnd}.{i}")], 4) for i in range(z.stall_images))
        )
        # The window: the first image request sent to the last one's first token (one clock, CLOCK_MONOTONIC).
        start_m, end_m = min(s.sent for s in streams), max(s.sent + s.ttft for s in streams)
        await asyncio.sleep(0.3)  # a couple more chunks, to close the last gap
        for s in streams:
            check("single", s)
    finally:
        ts.stop()
    if ts.error:
        raise RuntimeError(f"text stream: {ts.error}")
    gaps = ts.gaps(start_m, end_m)
    if not gaps:
        raise RuntimeError("text stream made no chunks around the image requests")
    worst, worst_k = max(gaps)
    return {
        "alone_max_gap_s": max(alone),
        "alone_median_gap_s": statistics.median(alone),
        "alone_ms_per_token": 1000 * (t_alone[-1] - a0) / max(alone_tokens, 1),
        "during_max_gap_s": worst,
        "during_max_gap_tokens": worst_k,
        "during_max_gap_per_token_s": max(g / k for g, k in gaps),
        "window_s": end_m - start_m,
        "chunks_during": sum(start_m <= t <= end_m for t in ts.times),
        "image_ttfts_s": sorted(s.ttft for s in streams),
        "stream_ended_early": ts.ended_early,
    }


async def measure(srv: Server, images: Images, z: Sizes, check: Check, rnd: int) -> dict[str, Any]:
    name = SERVERS[srv.key]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        out: dict[str, Any] = {"warm_s": await warm_up(client, srv, images, check, rnd)}
        out["ttft"] = await ttft_single(client, srv, images, z, check, rnd)
        print(
            f"  {name}: TTFT "
            + ", ".join(f"{1000 * r['ttft_s']:.0f}" for r in out["ttft"])
            + f" ms ({out['ttft'][0]['prompt_tokens']} prompt tokens)",
            flush=True,
        )
        out["levels"] = {}
        for n in z.levels:
            r = out["levels"][n] = await concurrent(client, srv, images, z, check, rnd, n)
            print(
                f"  {name}: {n} concurrent: {r['tokens']} tokens in {r['wall_s']:.2f} s = {r['tps']:.1f} tok/s "
                f"(TTFT p50 {1000 * r['ttft_p50_s']:.0f} ms)",
                flush=True,
            )
            await asyncio.sleep(0.2)
        r = out["follow_up"] = await follow_up(client, srv, images, check, rnd)
        if srv.key == "peer":  # its vision-feature cache's counters: did turn 2 skip the tower?
            try:
                out["peer_cache_stats"] = (await client.get(f"{srv.url}/v1/cache/stats")).json()
            except (httpx.HTTPError, ValueError) as exc:
                out["peer_cache_stats"] = {"error": str(exc)}
        print(
            f"  {name}: follow-up TTFT {1000 * r['turn2_ttft_s']:.0f} ms vs turn 1 {1000 * r['turn1_ttft_s']:.0f} "
            f"ms ({r['turn2_cached_tokens']} of {r['turn2_prompt_tokens']} tokens cached)",
            flush=True,
        )
        await asyncio.sleep(0.2)
        r = out["stall"] = await encode_stall(client, srv, images, z, check, rnd)
        print(
            f"  {name}: text stream gaps alone max {1000 * r['alone_max_gap_s']:.1f} / median "
            f"{1000 * r['alone_median_gap_s']:.1f} ms; while {z.stall_images} images encode "
            f"({1000 * r['window_s']:.0f} ms) max {1000 * r['during_max_gap_s']:.1f} ms",
            flush=True,
        )
    return out


def run_one(
    key: str,
    model_dir: Path,
    work: Path,
    peer_python: Optional[Path],
    preimport: bool,
    images: Images,
    z: Sizes,
    check: Check,
    rnd: int,
) -> dict[str, Any]:
    srv = start(key, model_dir, work, peer_python, preimport)
    try:
        meter = CpuMeter(srv.proc.pid)
        out = asyncio.run(measure(srv, images, z, check, rnd))
        out["other_cores"] = meter.other_cores()
    finally:
        stop(srv)
    return out


def probe_ours(model_dir: Path, work: Path, images: Images) -> Optional[str]:
    """Our server started plainly: None if an image request succeeds, else the error it answered."""
    srv = start("ours", model_dir, work, None, preimport=False)

    async def go() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as client:
            await chat(client, srv, [image_message(images, "probe")], 4)

    try:
        asyncio.run(go())
        return None
    except HTTPFailure as exc:
        return str(exc)
    finally:
        stop(srv)


# ----------------------------------------------------------------------------------------------------- report


def med(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def summarize(runs: dict[str, list[dict[str, Any]]], z: Sizes) -> dict[str, dict[str, Optional[float]]]:
    rows: dict[str, dict[str, Optional[float]]] = {}
    for key, rs in runs.items():
        rs = [r for r in rs if "error" not in r]
        row: dict[str, Optional[float]] = {"ttft_s": med([t["ttft_s"] for r in rs for t in r["ttft"]])}
        for n in z.levels:
            row[f"tps_{n}"] = med([r["levels"][n]["tps"] for r in rs])
            row[f"ttft_p50_{n}"] = med([r["levels"][n]["ttft_p50_s"] for r in rs])
            row[f"decode_{n}"] = med(
                [
                    r["levels"][n]["decode_ms_per_token_p50"]
                    for r in rs
                    if r["levels"][n]["decode_ms_per_token_p50"] is not None
                ]
            )
        for k in ("turn1_ttft_s", "turn2_ttft_s", "ratio", "turn2_cached_tokens", "turn2_prompt_tokens"):
            vals = [r["follow_up"][k] for r in rs if r["follow_up"][k] is not None]
            row[f"fu_{k}"] = med(vals)
        for k in (
            "alone_max_gap_s",
            "alone_median_gap_s",
            "during_max_gap_s",
            "during_max_gap_per_token_s",
            "window_s",
            "alone_ms_per_token",
        ):
            row[f"st_{k}"] = med([r["stall"][k] for r in rs])
        row["other_cores"] = med([r["other_cores"] for r in rs])
        rows[key] = row
    return rows


def table(rows: dict[str, dict[str, Optional[float]]], z: Sizes, image_tokens: int) -> str:
    ours, peer = rows.get("ours", {}), rows.get("peer", {})

    def cell(v: Optional[float], scale: float, fmt: str) -> str:
        return "-" if v is None else format(v * scale, fmt)

    def ratio(k: str) -> str:
        a, b = ours.get(k), peer.get(k)
        return "-" if a is None or not b else f"{a / b:.2f}"

    spec: list[tuple[str, str, float, str, bool]] = [
        (f"1. TTFT, 1 image ({image_tokens} img tokens), ms", "ttft_s", 1000, ".0f", True)
    ]
    for n in z.levels:
        spec.append((f"2. {n} concurrent images, aggregate tok/s", f"tps_{n}", 1, ".1f", True))
        spec.append((f"   {n} concurrent, median TTFT ms", f"ttft_p50_{n}", 1000, ".0f", True))
        spec.append((f"   {n} concurrent, ms/token after first", f"decode_{n}", 1, ".2f", True))
    spec += [
        ("3. turn 1 TTFT, ms", "fu_turn1_ttft_s", 1000, ".0f", True),
        ("   follow-up turn TTFT, ms", "fu_turn2_ttft_s", 1000, ".0f", True),
        ("   follow-up ÷ turn 1", "fu_ratio", 1, ".2f", True),
        ("   follow-up cached / prompt tokens", "", 1, "", False),
        ("4. text stream, ms/token alone", "st_alone_ms_per_token", 1, ".2f", True),
        ("   longest gap alone, ms", "st_alone_max_gap_s", 1000, ".1f", True),
        (f"   longest gap, {z.stall_images} images arriving, ms", "st_during_max_gap_s", 1000, ".1f", True),
        ("   their encode+prefill window, ms", "st_window_s", 1000, ".0f", True),
        ("other cores busy (CPU of others)", "other_cores", 1, ".2f", False),
    ]
    w = max(len(s[0]) for s in spec) + 2
    lines = [f"{'metric':<{w}}{'mlx-server':>12}{'mlx_vlm.server':>16}{'ours ÷ peer':>13}"]
    for label, k, scale, fmt, with_ratio in spec:
        if not k:
            vals = []
            for r in (ours, peer):
                c, p = r.get("fu_turn2_cached_tokens"), r.get("fu_turn2_prompt_tokens")
                vals.append(f"{'-' if c is None else format(c, '.0f')}/{'-' if p is None else format(p, '.0f')}")
            lines.append(f"{label:<{w}}{vals[0]:>12}{vals[1]:>16}{'':>13}")
            continue
        lines.append(
            f"{label:<{w}}{cell(ours.get(k), scale, fmt):>12}{cell(peer.get(k), scale, fmt):>16}"
            f"{ratio(k) if with_ratio else '':>13}"
        )
    return "\n".join(lines)


def detok_norm(text: str) -> str:
    """The two servers' detokenizers differ on the same tokens: mlx_lm's BPEStreamingDetokenizer (ours) trims the
    first token's leading space and leaves byte-level BPE's U+0100 (byte 0x00) as it is; mlx-vlm's does neither."""
    return text.lstrip(" ").replace("\x00", "\u0100")


def versions(peer_python: Optional[Path]) -> dict[str, str]:
    from importlib.metadata import version

    rev = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    out = {
        "mlx-server": f"{version('mlx-server')} ({rev})",
        "mlx": version("mlx"),
        "mlx-vlm (ours)": version("mlx-vlm"),
        "transformers (ours)": version("transformers"),
    }
    if peer_python is not None:
        code = "from importlib.metadata import version as v; print(v('mlx-vlm'), v('mlx'), v('transformers'))"
        got = subprocess.run([str(peer_python), "-c", code], capture_output=True, text=True).stdout.split()
        if len(got) == 3:
            out.update({"mlx-vlm (peer)": got[0], "mlx (peer)": got[1], "transformers (peer)": got[2]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-sized: 1 round, levels 1,4, fewer TTFT runs")
    ap.add_argument("--rounds", type=int, default=None, help="server processes per side, alternating (4; quick 1)")
    ap.add_argument("--ttft-runs", type=int, default=None, help="single-image TTFT requests per round (3; quick 2)")
    ap.add_argument("--levels", default=None, help="concurrency levels, comma-separated (1,4,8; quick 1,4)")
    ap.add_argument("--tokens", type=int, default=32, help="max tokens per request at each level")
    ap.add_argument("--image-size", type=int, default=224, help="square picture side, px (a multiple of 16)")
    ap.add_argument("--alone", type=float, default=None, help="s the text stream decodes alone (1.5; quick 1)")
    ap.add_argument("--servers", default="ours,peer", help="comma-separated subset of ours,peer")
    ap.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help="venv with mlx-vlm (built if missing)")
    ap.add_argument(
        "--ours-preimport",
        choices=("auto", "yes", "no"),
        default="auto",
        help=f"start our server with {PREIMPORT} imported first (see above)",
    )
    ap.add_argument("--json", type=Path, default=Path("bench_vision.json"))
    args = ap.parse_args()
    q = args.quick
    if args.image_size % 16:
        ap.error("--image-size must be a multiple of 16")
    levels = [int(x) for x in (args.levels or ("1,4" if q else "1,4,8")).split(",") if x]
    z = Sizes(
        rounds=args.rounds or (1 if q else 4),
        ttft_runs=args.ttft_runs or (2 if q else 3),
        levels=levels,
        tokens=args.tokens,
        alone=args.alone or (1.0 if q else 1.5),
        stall_images=4,
        stream_tokens=3500,
    )
    keys = [k for k in args.servers.split(",") if k]
    if unknown := set(keys) - set(SERVERS):
        ap.error(f"unknown servers {sorted(unknown)}; choose from {list(SERVERS)}")

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mlx-bench-vision-"))
    model_dir, model_desc = build_model(work, args.image_size)
    images = Images(args.image_size)
    peer_python: Optional[Path] = None
    venv_info: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if "peer" in keys:
        try:
            peer_python, venv_info = ensure_peer_venv(args.peer_venv)
            state = "built now" if venv_info["built_now"] else "cached"
            print(
                f"peer venv {venv_info['venv']} ({state}; build took {venv_info.get('install_s', '?')} s, "
                f"{venv_info.get('size_bytes', 0) / 1e6:.0f} MB, pip install "
                f"{' '.join(venv_info.get('requirements', []))})",
                flush=True,
            )
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            errors["peer"] = f"peer venv: {exc}"
            print(f"peer unavailable: {exc}", file=sys.stderr)
            keys.remove("peer")
    vers = versions(peer_python)
    print(f"model {model_desc}; logs in {work}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)

    tower = tower_ms(model_dir, images)
    print(
        f"vision tower in-process, one {args.image_size}x{args.image_size} picture ({tower['patches']} patches): "
        f"{tower['median_ms']:.0f} ms (runs " + ", ".join(f"{t:.0f}" for t in tower["runs_ms"]) + ")",
        flush=True,
    )

    preimport = args.ours_preimport == "yes"
    plain_error: Optional[str] = None
    if "ours" in keys and args.ours_preimport == "auto":
        plain_error = probe_ours(model_dir, work / "probe", images)
        if plain_error:
            preimport = True
            print(
                f"NOTE our server, started plainly, fails image requests: {plain_error.splitlines()[0]}\n"
                f"     (full answer in the JSON); measuring it started with {PREIMPORT} imported first",
                flush=True,
            )
        else:
            print("our server, started plainly, answers image requests", flush=True)

    checks = {k: Check() for k in SERVERS}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for rnd in range(z.rounds):
        order = keys if rnd % 2 == 0 else keys[::-1]
        for key in order:
            print(f"round {rnd + 1}/{z.rounds}, {SERVERS[key]}:", flush=True)
            t = time.monotonic()
            try:
                r = run_one(key, model_dir, work / f"{key}{rnd}", peer_python, preimport, images, z, checks[key], rnd)
            except Exception as exc:  # noqa: BLE001 - one broken server must not hide the other's figures
                traceback.print_exc()
                r = {"error": f"{type(exc).__name__}: {exc}"}
                errors.setdefault(key, r["error"])
            r["elapsed_s"] = time.monotonic() - t
            runs[key].append(r)

    rows = summarize(runs, z)
    # Both servers see the same pictures with the same weights, greedy: compare their answers and prompt lengths.
    a, b = checks["ours"], checks["peer"]
    shared = sorted(set(a.answers) & set(b.answers))
    same = sum(a.answers[t] == b.answers[t] for t in shared)
    same_norm = sum(detok_norm(a.answers[t]) == detok_norm(b.answers[t]) for t in shared)
    distinct = len(set(a.answers.values()))
    print()
    print(table(rows, z, model_desc["image_tokens"]))
    print()
    for key in keys:
        c = checks[key]
        print(
            f"{SERVERS[key]}: prompt tokens per kind { ({k: sorted(v) for k, v in c.prompt_tokens.items()}) }; "
            f"empty answers: {len(c.empty)}{' ' + str(c.empty[:3]) if c.empty else ''}"
        )
    if shared:
        print(
            f"greedy answers to the same pictures: {same} of {len(shared)} identical between the servers, "
            f"{same_norm} up to detokenization (a first token's leading space, byte 0 as U+0100); ours gave "
            f"{distinct} distinct answers to {len(a.answers)} different pictures"
        )
    if plain_error:
        print(
            f"our server started plainly: {plain_error.splitlines()[0][:200]} (measured with {PREIMPORT} pre-imported)"
        )
    for key, e in errors.items():
        print(f"ERROR {SERVERS[key]}: {e[:500]}")
    elapsed = time.monotonic() - t_start
    print(f"(medians of {z.rounds} round(s); total {elapsed:.0f} s; JSON in {args.json})")
    args.json.write_text(
        json.dumps(
            {
                "model": model_desc,
                "sizes": z.__dict__,
                "versions": vers,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
                "peer_venv": venv_info,
                "tower_in_process": tower,
                "ours_plain_start_error": plain_error,
                "ours_preimport": preimport,
                "summary": rows,
                "answers": {
                    "ours": a.answers,
                    "peer": b.answers,
                    "identical": same,
                    "identical_up_to_detokenization": same_norm,
                    "compared": len(shared),
                },
                "prompt_tokens": {k: {kk: sorted(v) for kk, v in c.prompt_tokens.items()} for k, c in checks.items()},
                "empty_answers": {k: c.empty for k, c in checks.items()},
                "errors": errors,
                "runs": {k: v for k, v in runs.items()},
                "elapsed_s": elapsed,
            },
            indent=2,
            default=str,
        )
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
