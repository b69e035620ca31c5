"""What every dialect shares: the app context, JSON bodies, model resolution, and event collection."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Optional

import numpy as np
from starlette.requests import Request

from mlx_server.api.catalog import Catalog
from mlx_server.api.responses_store import ResponseStore
from mlx_server.config.load import Config
from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.events import Delta, Done, Event, Failed, Started, TokenLogprob, Usage
from mlx_server.contract.requests import EngineRequest, GenerateRequest
from mlx_server.contract.status import EngineClient
from mlx_server.models.blobs import BlobStore
from mlx_server.models.create import Workshop
from mlx_server.models.info import ModelInfo
from mlx_server.models.registry import Registry
from mlx_server.models.sources import Located

log = logging.getLogger("mlx_server.api")


@dataclass
class AppContext:
    config: Config
    engine: EngineClient  # a protocol: the API never imports MLX, and tests hand in a FakeEngine
    catalog: Catalog  # model files and info, read off the event loop
    blobs: BlobStore  # uploaded files (/api/blobs) that /api/create names by digest
    workshop: Workshop  # where /api/create builds models, and the registry that keeps them
    metrics: Any = None  # mlx_server.api.metrics.Metrics
    problems: Any = None  # mlx_server.models.diagnose.ProblemCache: why configured models cannot serve (/health)
    responses: Optional[ResponseStore] = None  # stored /v1/responses (previous_response_id, GET)
    tools_warned: set[str] = field(default_factory=set)  # ignored-tool notes logged once already (by model, by kind)
    started: float = field(default_factory=time.time)

    @property
    def registry(self) -> Registry:
        """The models created over the API (/api/create, /api/copy), served beside models.yaml's."""
        return self.workshop.registry

    # Disk work (locate, GGUF headers) runs in the catalog's workers: handlers await, the loop never blocks.

    async def located(self, name: str) -> Located:
        return await self.catalog.located(name)

    async def info(self, name: str) -> Optional[ModelInfo]:
        return await self.catalog.info(name)

    async def resolve(self, requested: str) -> str:
        """The configured name for a requested one; 404 when unknown or not on disk (with how to get it)."""
        return await self.catalog.resolve(requested)


def ctx_of(request: Request) -> AppContext:
    return request.app.state.ctx


def note_model(request: Request, name: str) -> None:
    """Label this request's metrics and log line with the model it resolved to."""
    request.scope.setdefault("state", {})["model"] = name


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"invalid JSON body: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:  # "\ud800" escapes (and json's surrogatepass decoding) yield strs that tokenizers and UTF-8 replies reject
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest("invalid JSON body: a string holds a lone UTF-16 surrogate") from None
    return data


MAX_JSON_DEPTH = 64


def _depth(value: Any) -> int:
    """Deepest nesting of lists and objects, without recursion (the input decides how deep it goes)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def rfc3339(when: Optional[dt.datetime] = None) -> str:
    when = when or dt.datetime.now(dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return int(max(seconds, 0.0) * 1e9)


def field_type(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """data[key] if it has the right JSON type (None passes), else a 400 naming the field."""
    value = data.get(key)
    if value is None:
        return None
    bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if bad_bool or not isinstance(value, kind):
        raise BadRequest(f'invalid value for field "{key}": expected {what}')
    return value


@dataclass
class Collected:
    """A whole generation, for non-streaming responses."""

    started: Optional[Started] = None
    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    thinking_tokens: int = 0  # tokens of deltas that carried thinking only (the Responses API reports them)
    done: Optional[Done] = None

    @property
    def usage(self) -> Usage:
        return self.done.usage if self.done else Usage()


@dataclass
class Progress:
    """What a request has done so far, from its events: its log line when it ends without a Done (the client
    went away) still says what it prompted, generated and when its first token came."""

    started_at: float  # time.perf_counter() at arrival
    prompt: int = 0
    cached: int = 0
    generated: int = 0
    first: Optional[float] = None

    def see(self, event: Event) -> None:
        if isinstance(event, Started):
            self.prompt, self.cached = event.prompt_tokens, event.cached_tokens
        elif isinstance(event, Delta):
            self.generated += event.tokens
            if self.first is None and event.tokens:
                self.first = time.perf_counter()

    def usage(self) -> Usage:
        now = time.perf_counter()
        first = self.first if self.first is not None else now
        return Usage(
            prompt_tokens=self.prompt,
            cached_tokens=self.cached,
            completion_tokens=self.generated,
            prompt_eval_duration=first - self.started_at if self.first is not None else 0.0,
            eval_duration=now - first,
            total_duration=now - self.started_at,
        )


async def first_event(events: AsyncIterator[Event], request: Request) -> Event:
    """The first event, giving up (and cancelling in the engine) if the client leaves while we wait.

    A queued or loading request sends no bytes, so only polling notices a client that went away.
    """
    nxt = asyncio.ensure_future(events.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=0.25)
            if done:
                return nxt.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
    except BaseException:
        nxt.cancel()
        await close_events(events)
        raise


async def collect(
    events: AsyncIterator[Event], request: Request, first: Event, progress: Optional[Progress] = None
) -> Collected:
    """Gather a non-streaming generation; a client that disconnects cancels it within one step."""
    out = Collected()
    event: Optional[Event] = first
    try:
        while True:
            if event is None:
                event = await first_event(events, request)
            if progress is not None:
                progress.see(event)
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Started):
                out.started = event
            elif isinstance(event, Delta):
                out.content += event.content
                out.thinking += event.thinking
                out.tool_calls.extend(event.tool_calls)
                out.logprobs.extend(event.logprobs)
                if event.thinking and not event.content:
                    out.thinking_tokens += event.tokens
            elif isinstance(event, Done):
                out.done = event
                return out
            event = None
    finally:
        await close_events(events)


async def await_array(
    request: Request,
    req: EngineRequest,
    result: type,
    attr: str,
    checked: Callable[[Optional[np.ndarray]], np.ndarray],
    where: tuple[str, str, float],
) -> tuple[np.ndarray, Usage]:
    """Submit `req` and wait for its one `result` event's `attr` as a float32 array, passed through `checked`
    (embeddings, rerank scores); a client that goes away cancels it in the engine. `where` = (dialect, model as
    requested, arrival perf_counter) for its log line."""
    events, event = await begin(request, req)  # a refusal (404, 400, 503, ...) raises here
    status, usage, found = "disconnected", Usage(), None
    try:
        while True:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, result):
                found = np.asarray(getattr(event, attr), dtype=np.float32)
            elif isinstance(event, Done):
                usage = event.usage
                break
            event = await first_event(events, request)
        array = checked(found)
        status = "ok"
        return array, usage
    except MlxServerError as exc:
        status = f"error: {exc.message}"
        raise
    finally:
        await close_events(events)
        request_log(where[0], where[1], status, usage, where[2])


async def begin(request: Request, req: EngineRequest) -> tuple[AsyncIterator[Event], Event]:
    """Submit and wait for the first event; a request refused before it started raises its error (→ 4xx/5xx)."""
    events = ctx_of(request).engine.stream(req)
    first = await first_event(events, request)
    if isinstance(first, Failed):
        await close_events(events)
        raise first.error
    return events, first


async def follow(
    events: AsyncIterator[Event], first: Event, dialect: str, model: str, started_at: float
) -> AsyncGenerator[Event, None]:
    """A streaming request's events from `first` through Done or Failed.

    Whatever ends it (its end, an error, the client going away), the engine stream is closed, which cancels
    an unfinished request, and the request gets its one log line. Consume it under contextlib.aclosing so that
    happens at once rather than whenever the generator is collected.
    """
    status, usage, event = "ok", Usage(), first
    progress = Progress(started_at)
    try:
        while True:
            progress.see(event)
            yield event
            if isinstance(event, Done):
                usage = event.usage
                return
            if isinstance(event, Failed):
                status = f"error: {event.error.message}"
                return
            event = await events.__anext__()
    except BaseException:
        status, usage = "disconnected", progress.usage()
        raise
    finally:
        await close_events(events)
        request_log(dialect, model, status, usage, started_at)


async def close_events(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing a finished generator must not mask the real outcome
            pass


def error_body(exc: MlxServerError) -> dict[str, Any]:
    return {"error": exc.message}


def request_log(dialect: str, model: str, status: str, usage: Usage, started_at: float) -> None:
    elapsed = time.perf_counter() - started_at
    tps = usage.completion_tokens / usage.eval_duration if usage.eval_duration > 0 else 0.0
    fields = {
        "dialect": dialect,
        "model": model,
        "served_by": "mlx-server",
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
        "generated_tokens": usage.completion_tokens,
        "ttft_s": round(usage.prompt_eval_duration, 4),
        "tokens_per_s": round(tps, 2),
        "total_s": round(elapsed, 4),
        "status": status,
    }
    log.info(
        "%s model=%s served_by=mlx-server prompt=%d cached=%d generated=%d ttft=%.3fs tok/s=%.1f total=%.3fs status=%s",
        dialect,
        model,
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
        usage.prompt_eval_duration,
        tps,
        elapsed,
        status,
        extra={"fields": fields},
    )


__all__ = [
    "AppContext",
    "Collected",
    "GenerateRequest",
    "collect",
    "ctx_of",
    "error_body",
    "field_type",
    "first_event",
    "ns",
    "read_json",
    "rfc3339",
]
