"""Reranking in the shape Jina, Cohere and Open WebUI's external reranker speak: `POST /v1/rerank`, `/rerank`,
Cohere's `/v2/rerank`, and `/api/rerank` for Ollama-style clients, all with one body.

`{model, query, documents: [str | {"text": str}], top_n, return_documents}` →
`{id, model, results: [{index, relevance_score, document: {text}}], usage: {total_tokens}}`, results sorted by
score (ties in document order) and cut to `top_n` (absent, 0 or more than the documents: all of them, as vLLM
reads it). `return_documents` defaults to true (Jina's and vLLM's answer carries the text; Cohere clients ignore
it). An optional `instruction` is a decoder reranker's task line (Qwen3-Reranker's "Instruct").

Translation only: the body becomes one RerankRequest, the engine's Scores + Done become the answer. Errors take
each path's dialect shape through the app's error handler: /v1/rerank OpenAI's, /api/rerank Ollama's, and the
bare /rerank and /v2/rerank OpenAI's too (the `RERANK` dialect in api/routes.py): `{"error": {"message", ...}}`,
which Jina / Cohere clients show as the message, and which is what an OpenAI-compatible server answers there.
No documents answer no results without loading the model (unless the model cannot rerank at all: 400).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from mlx_server.api.context import (
    await_array,
    ctx_of,
    field_type,
    note_model,
    read_json,
)
from mlx_server.api.dialects import openai
from mlx_server.api.dialects.base import Handler, named_model
from mlx_server.api.dialects.ollama import parse_keep_alive
from mlx_server.api.dialects.options import OLLAMA_DEFAULTS
from mlx_server.api.dialects.sampling import resolve_sampling
from mlx_server.contract.errors import BadRequest, InternalError
from mlx_server.contract.events import Scores, Usage
from mlx_server.contract.requests import Priority, RerankRequest

DOCUMENT_TYPE = 'expected a string or an object with a "text" string'


@dataclass(frozen=True)
class Ask:
    """What one request body asks for, before its model is resolved."""

    query: str
    documents: tuple[str, ...]
    top_n: Optional[int] = None  # None: every document
    return_documents: bool = True
    instruction: Optional[str] = None
    keep_alive: Optional[float] = None
    options: dict[str, Any] = field(default_factory=dict)  # Ollama options (num_ctx is the one that matters)


def _document(index: int, item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    raise BadRequest(f"invalid document at index {index}: {DOCUMENT_TYPE}")


def parse(body: dict[str, Any]) -> Ask:
    query = body.get("query")
    if not isinstance(query, str):
        raise BadRequest('"query" is required and must be a string')
    raw = body.get("documents")
    if not isinstance(raw, list):
        raise BadRequest('"documents" is required and must be an array of documents')
    top_n = field_type(body, "top_n", int, "an integer")
    if top_n is not None and top_n < 0:
        raise BadRequest('invalid value for field "top_n": must not be negative')
    returned = field_type(body, "return_documents", bool, "a boolean")
    return Ask(
        query=query,
        documents=tuple(_document(i, item) for i, item in enumerate(raw)),
        top_n=top_n or None,
        return_documents=True if returned is None else returned,
        instruction=field_type(body, "instruction", str, "a string") or None,
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        options=field_type(body, "options", dict, "an object") or {},
    )


def answer(requested: str, ask: Ask, scores: np.ndarray, usage: Usage) -> dict[str, Any]:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[: ask.top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if ask.return_documents:
            result["document"] = {"text": ask.documents[i]}
        results.append(result)
    return {
        "id": f"rerank-{secrets.token_hex(12)}",
        "model": requested,
        "results": results,
        "usage": {"total_tokens": usage.prompt_tokens},
    }


async def score(
    request: Request, req: RerankRequest, dialect: str, requested: str, started_at: float
) -> tuple[np.ndarray, Usage]:
    """Submit `req` and wait for its scores (in document order); a client that goes away cancels it in the engine."""

    def checked(scores: Optional[np.ndarray]) -> np.ndarray:
        if scores is None or scores.shape != (len(req.documents),):
            got = "no" if scores is None else scores.shape
            raise InternalError(f"the engine answered {len(req.documents)} documents with {got} scores")
        if not np.isfinite(scores).all():
            raise InternalError("the model's relevance scores contain NaN or Inf")
        return scores

    return await await_array(request, req, Scores, "scores", checked, (dialect, requested, started_at))


def rerank_route(dialect: str, missing: str) -> Handler:
    """read body → parse → resolve model → score (unless there is nothing to score) → answer."""
    target = named_model(missing)

    async def handle(request: Request) -> Response:
        arrival, started_at = time.monotonic(), time.perf_counter()
        ctx = ctx_of(request)
        body = await read_json(request)
        ask = parse(body)
        requested, name = await target(ctx, body)
        note_model(request, name)
        num_ctx = resolve_sampling(ctx.config.models[name].options, ask.options, OLLAMA_DEFAULTS).num_ctx
        usage = Usage()
        if not ask.documents:
            info = await ctx.info(name)
            if info is not None and "rerank" not in info.capabilities:
                raise BadRequest(f'"{requested}" does not support rerank')
            scores = np.zeros((0,), dtype=np.float32)
        else:
            req = RerankRequest(
                model=name,
                query=ask.query,
                documents=ask.documents,
                instruction=ask.instruction,
                num_ctx=num_ctx,
                keep_alive=ask.keep_alive,
                priority=Priority.parse(request.headers.get("x-request-priority")),
                timeout=ctx.config.server.request_timeout,
                created=arrival,
            )
            scores, usage = await score(request, req, dialect, requested, started_at)
        payload = answer(requested, ask, scores, usage)
        # Every document's text goes back out: a big answer is written off the event loop.
        content = await asyncio.to_thread(json.dumps, payload, ensure_ascii=False, separators=(",", ":"))
        return Response(content.encode(), media_type="application/json")

    return handle


# The bare /rerank and Cohere's /v2/rerank are no dialect's: they answer errors as OpenAI does (api/routes.py).
error_body = openai.error_body
http_error_body = openai.http_error_body

openai_rerank = rerank_route("openai", "you must provide a model parameter")
rerank = rerank_route("rerank", "you must provide a model parameter")
ollama_rerank = rerank_route("ollama", "model is required")

__all__ = ["Ask", "answer", "error_body", "http_error_body", "ollama_rerank", "openai_rerank", "parse", "rerank"]
