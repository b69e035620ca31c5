"""Embeddings in Ollama's shapes (/api/embed, the legacy /api/embeddings) and OpenAI's (/v1/embeddings).

Translation only: each route turns its body into one EmbedRequest and the engine's Embeddings + Done into its
answer. The engine tokenizes, truncates at the context (or `num_ctx`), pools, cuts to `dimensions` and
L2-normalizes. Any configured model may be asked, as in Ollama, where generation models embed too. A model not
configured here never reaches these handlers when `server.fallback_url` is set (the fallback middleware proxies
it, as for generation routes); otherwise `ctx.resolve` answers 404. Errors take each path's dialect shape through
the app's error handler.

Vectors cross from the engine as one float32 array and are written to JSON in a worker thread: one `json.dumps`
of 1,000 × 384 floats takes ~0.4 s, which on the event loop would stall every stream for that long.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from mlx_server.api.context import (
    await_array,
    ctx_of,
    field_type,
    note_model,
    ns,
    read_json,
)
from mlx_server.api.dialects.base import Handler, named_model
from mlx_server.api.dialects.bodies import EmbeddingBody, validated
from mlx_server.api.dialects.ollama import parse_keep_alive
from mlx_server.api.dialects.options import OLLAMA_DEFAULTS
from mlx_server.api.dialects.sampling import resolve_sampling
from mlx_server.contract.errors import BadRequest, InternalError
from mlx_server.contract.events import Embeddings, Usage
from mlx_server.contract.requests import EmbedRequest, Priority


@dataclass(frozen=True)
class Ask:
    """What one request body asks for, before its model is resolved."""

    inputs: tuple[Any, ...]  # texts, or token-id tuples (OpenAI)
    truncate: bool = True
    dimensions: Optional[int] = None
    keep_alive: Optional[float] = None
    options: dict[str, Any] = field(default_factory=dict)  # Ollama options (num_ctx is the one that matters)
    base64: bool = False  # OpenAI encoding_format
    normalize: bool = True  # the legacy route returns vectors as pooled, as Ollama's does


@dataclass(frozen=True)
class Result:
    vectors: np.ndarray  # float32, (inputs, dimensions); (0, 0) when there were no inputs
    usage: Usage


Parse = Callable[[dict[str, Any]], Ask]
Answer = Callable[[str, Ask, Result], dict[str, Any]]


# ---- request parsing ------------------------------------------------------------------------------------------


def _dimensions(body: dict[str, Any]) -> Optional[int]:
    dimensions = field_type(body, "dimensions", int, "an integer")
    if dimensions is not None and dimensions < 1:
        raise BadRequest('invalid value for field "dimensions": must be a positive integer')
    return dimensions


def _ollama_common(body: dict[str, Any], inputs: tuple[str, ...], truncate: bool = True) -> Ask:
    options = field_type(body, "options", dict, "an object") or {}
    return Ask(
        inputs=inputs,
        truncate=truncate,
        dimensions=_dimensions(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        options=options,
    )


def parse_embed(body: dict[str, Any]) -> Ask:
    """/api/embed: `input` is a text or an array of texts. An empty text or array embeds nothing, as in Ollama."""
    raw = body.get("input")
    if raw is None or raw == "":
        inputs: tuple[str, ...] = ()
    elif isinstance(raw, str):
        inputs = (raw,)
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        inputs = tuple(raw)
    else:  # Ollama's words; the rest says what it takes
        raise BadRequest('invalid input type: "input" must be a string or an array of strings')
    truncate = field_type(body, "truncate", bool, "a boolean")
    return _ollama_common(body, inputs, truncate=True if truncate is None else truncate)


def parse_embeddings(body: dict[str, Any]) -> Ask:
    """/api/embeddings (legacy): one `prompt`; none or an empty one embeds nothing."""
    prompt = field_type(body, "prompt", str, "a string")
    return replace(_ollama_common(body, (prompt,) if prompt else ()), normalize=False)


def parse_openai(body: dict[str, Any]) -> Ask:
    """/v1/embeddings: texts or token ids (see bodies.EmbeddingBody); an empty array is a 400, as in OpenAI and
    in Ollama's OpenAI layer."""
    checked = validated(EmbeddingBody, body, "openai")
    return Ask(inputs=checked.input, dimensions=checked.dimensions, base64=checked.encoding_format == "base64")


# ---- answers --------------------------------------------------------------------------------------------------


def answer_embed(requested: str, ask: Ask, result: Result) -> dict[str, Any]:
    usage = result.usage
    return {
        "model": requested,
        "embeddings": list(result.vectors),
        "total_duration": ns(usage.total_duration),
        "load_duration": ns(usage.load_duration),
        "prompt_eval_count": usage.prompt_tokens,
    }


def answer_embeddings(requested: str, ask: Ask, result: Result) -> dict[str, Any]:
    return {"embedding": result.vectors[0] if len(result.vectors) else []}


def b64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def answer_openai(requested: str, ask: Ask, result: Result) -> dict[str, Any]:
    tokens = result.usage.prompt_tokens
    data = [
        {"object": "embedding", "index": i, "embedding": b64(v) if ask.base64 else v}
        for i, v in enumerate(result.vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": requested,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# ---- the route ------------------------------------------------------------------------------------------------


def _row(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(payload: dict[str, Any]) -> bytes:
    """JSON as Starlette writes it; vectors (numpy rows) become lists one row at a time, so the thread running
    this hands the GIL back to the event loop between rows."""
    return json.dumps(payload, default=_row, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def run(request: Request, req: EmbedRequest, dialect: str, requested: str, started_at: float) -> Result:
    """Submit `req` and wait for its vectors; a client that goes away cancels it in the engine."""

    def checked(vectors: Optional[np.ndarray]) -> np.ndarray:
        if vectors is None or vectors.ndim != 2 or len(vectors) != len(req.inputs):
            raise InternalError(
                f"the engine answered {len(req.inputs)} inputs with "
                f"{'no' if vectors is None else vectors.shape} vectors"
            )
        if not np.isfinite(vectors).all():
            raise BadRequest("embedding contains NaN or Inf values")  # Ollama's 400
        return vectors

    vectors, usage = await await_array(request, req, Embeddings, "vectors", checked, (dialect, requested, started_at))
    return Result(vectors, usage)


def embed_route(dialect: str, missing: str, parse: Parse, answer: Answer) -> Handler:
    """read body → parse → resolve model → embed (unless there is nothing to embed) → answer."""
    target = named_model(missing)

    async def handle(request: Request) -> Response:
        arrival, started_at = time.monotonic(), time.perf_counter()
        ctx = ctx_of(request)
        body = await read_json(request)
        ask = parse(body)
        requested, name = await target(ctx, body)
        note_model(request, name)
        # models.yaml's num_ctx applies as in generation; the request's `options` win (other options are checked
        # for their types, as Ollama does, and otherwise mean nothing here).
        num_ctx = resolve_sampling(ctx.config.models[name].options, ask.options, OLLAMA_DEFAULTS).num_ctx
        if not ask.inputs:
            result = Result(np.zeros((0, 0), dtype=np.float32), Usage())
        else:
            req = EmbedRequest(
                model=name,
                inputs=ask.inputs,
                truncate=ask.truncate,
                dimensions=ask.dimensions,
                normalize=ask.normalize,
                num_ctx=num_ctx,
                keep_alive=ask.keep_alive,
                priority=Priority.parse(request.headers.get("x-request-priority")),
                timeout=ctx.config.server.request_timeout,
                created=arrival,
            )
            result = await run(request, req, dialect, requested, started_at)
        content = await asyncio.to_thread(dumps, answer(requested, ask, result))
        return Response(content, media_type="application/json")

    return handle


embed = embed_route("ollama", "model is required", parse_embed, answer_embed)
embeddings = embed_route("ollama", "model is required", parse_embeddings, answer_embeddings)
openai_embeddings = embed_route("openai", "you must provide a model parameter", parse_openai, answer_openai)

__all__ = ["Ask", "Result", "b64", "dumps", "embed", "embed_route", "embeddings", "openai_embeddings"]
