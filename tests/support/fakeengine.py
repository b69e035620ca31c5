"""A FakeEngine implementing mlx_server.contract.status.EngineClient: records every request, answers from a script.

For route and dialect-translation tests only (milliseconds, no MLX); what the real engine does is tested end to
end against tiny models. The default script echoes: a generation's reply is the words of its last user
message (or prompt), one Delta per word, capped by max_tokens; loads, unloads and counts end as the engine
contract says; an embedding answers `fake_vectors` (a deterministic unit vector per input, FAKE_WIDTH wide, each
text cut to FAKE_CONTEXT words). Tests change `script`, `usage`, `prompt_tokens` / `cached_tokens`, or `refuse`
as they need.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

import numpy as np

from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.events import Delta, Done, Embeddings, Event, Failed, Scores, Started, Usage
from mlx_server.contract.requests import (
    CountTokensRequest,
    EmbedRequest,
    EngineRequest,
    GenerateRequest,
    LoadRequest,
    RerankRequest,
    UnloadRequest,
)
from mlx_server.contract.status import EngineClient, EngineStatus, Observer

Script = Callable[[EngineRequest], list[Event]]
FAKE_WIDTH = 8  # the fake embedding model's vector width
FAKE_CONTEXT = 16  # words (or token ids) an input is cut to


def _units(item: Union[str, tuple[int, ...]]) -> list[str]:
    return item.split() if isinstance(item, str) else [str(t) for t in item]


def fake_vectors(inputs: Sequence[Union[str, tuple[int, ...]]], dimensions: Optional[int] = None) -> np.ndarray:
    """What the FakeEngine answers: per input, a unit vector seeded by its first FAKE_CONTEXT words (or ids),
    cut to `dimensions` and normalized again, as the engine contract says. float32, (inputs, width)."""
    rows = []
    for item in inputs:
        seed = hashlib.sha256(" ".join(_units(item)[:FAKE_CONTEXT]).encode()).digest()
        v = np.random.default_rng(int.from_bytes(seed[:8], "little")).standard_normal(FAKE_WIDTH)[:dimensions]
        rows.append(v / np.linalg.norm(v))
    return np.array(rows, dtype=np.float32).reshape(len(rows), dimensions or FAKE_WIDTH)


def fake_model(path: Path, template: str, **config: Any) -> Path:
    """A model dir with just enough files to be found and described (no weights worth loading: the engine is
    fake); `config` adds to its config.json (e.g. a vision_config)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                                                 "num_attention_heads": 1, "max_position_embeddings": 512, **config}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def reply_words(req: GenerateRequest) -> list[str]:
    if req.messages:
        users = [m.content for m in req.messages if m.role == "user"]
        text = users[-1] if users else ""
    else:
        text = req.prompt or ""
    return text.split()


class FakeEngine:
    def __init__(self, script: Optional[Script] = None, *, prompt_tokens: int = 12, cached_tokens: int = 0,
                 refuse: Optional[MlxServerError] = None) -> None:
        self.observers: list[Observer] = []
        self.forgotten: list[str] = []
        self.running = False
        self.draining = False
        self.reset(script, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens, refuse=refuse)

    def reset(self, script: Optional[Script] = None, *, prompt_tokens: int = 12, cached_tokens: int = 0,
              refuse: Optional[MlxServerError] = None) -> None:
        """A fresh script and record, for a server shared by several tests."""
        self.requests: list[EngineRequest] = []
        self.script: Script = script or self.echo
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.refuse = refuse

    # ---- EngineClient ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.running = True

    def stop(self, timeout: float = 10.0) -> None:
        self.running = False

    def drain(self) -> None:
        self.draining = True

    def status(self) -> EngineStatus:
        return EngineStatus(alive=self.running, draining=self.draining)

    def preload(self, names: Sequence[str]) -> None:
        pass

    def forget(self, name: str) -> None:
        self.forgotten.append(name)

    def observe(self, observer: Observer) -> None:
        self.observers.append(observer)

    async def stream(self, request: EngineRequest) -> AsyncIterator[Event]:
        if self.refuse is not None:  # like the real engine: a refusal raises before the first event
            raise self.refuse
        self.requests.append(request)
        for event in self.script(request):
            for observer in self.observers:
                observer(request, event)
            await asyncio.sleep(0)  # a real stream yields to the loop between events
            yield event

    # ---- the default script -------------------------------------------------------------------------------

    @property
    def last(self) -> EngineRequest:
        return self.requests[-1]

    def echo(self, req: EngineRequest) -> list[Event]:
        rid = req.request_id
        if isinstance(req, LoadRequest):
            return [Done(rid, req.model, "load", Usage())]
        if isinstance(req, UnloadRequest):
            return [Done(rid, req.model, "unload", Usage())]
        if isinstance(req, CountTokensRequest):
            return [Done(rid, req.model, "stop", Usage(prompt_tokens=self.prompt_tokens))]
        if isinstance(req, EmbedRequest):
            return self.embed(req)
        if isinstance(req, RerankRequest):
            return self.rerank(req)
        words = reply_words(req)
        limit = req.max_tokens if req.max_tokens is not None else len(words)
        said = words[:limit]
        usage = Usage(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                      completion_tokens=len(said), prompt_eval_duration=0.01, eval_duration=0.02,
                      total_duration=0.05)
        events: list[Event] = [Started(rid, req.model, self.prompt_tokens, self.cached_tokens, 0.0)]
        events += [Delta(rid, content=(" " if i else "") + w, tokens=1) for i, w in enumerate(said)]
        events.append(Done(rid, req.model, "length" if len(words) > limit else "stop", usage))
        return events

    def embed(self, req: EmbedRequest) -> list[Event]:
        rid = req.request_id
        if req.dimensions is not None and req.dimensions > FAKE_WIDTH:
            return [Failed(rid, BadRequest(f"dimensions {req.dimensions} is above the model's {FAKE_WIDTH}"))]
        lengths = [len(_units(item)) for item in req.inputs]
        if not req.truncate:
            for i, n in enumerate(lengths):
                if n > FAKE_CONTEXT:
                    return [Failed(rid, BadRequest(f"input {i} is {n} tokens, longer than the context "
                                                   f"({FAKE_CONTEXT}), and truncate is false"))]
        tokens = sum(min(n, FAKE_CONTEXT) for n in lengths)
        usage = Usage(prompt_tokens=tokens, load_duration=0.25, prompt_eval_duration=0.5, total_duration=1.0)
        return [Embeddings(rid, req.model, fake_vectors(req.inputs, req.dimensions), tokens),
                Done(rid, req.model, "stop", usage)]

    def rerank(self, req: RerankRequest) -> list[Event]:
        """A document's score is the share of the query's words it contains, in document order."""
        query = set(req.query.lower().split())
        scores = [len(query & set(d.lower().split())) / max(len(query), 1) for d in req.documents]
        tokens = sum(len(req.query.split()) + len(d.split()) for d in req.documents)
        usage = Usage(prompt_tokens=tokens, prompt_eval_duration=0.1, total_duration=0.2)
        return [Scores(req.request_id, req.model, np.array(scores, dtype=np.float32), tokens),
                Done(req.request_id, req.model, "stop", usage)]


__all__ = ["FAKE_CONTEXT", "FAKE_WIDTH", "FakeEngine", "fake_model", "fake_vectors", "reply_words"]


def checked(engine: FakeEngine) -> EngineClient:
    """The type checker holds the fake to the engine contract here (scripts/test runs mypy on this file)."""
    return engine
