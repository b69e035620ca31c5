"""What a dialect supplies: the pieces the registry (api/routes.py) and its one route skeleton put together.

A dialect is data. `Dialect` holds what is the same for all its routes (the error body shape, how a stream is
framed and sent); each `Endpoint` is one route, and a generation route carries a `Generation`: how a body
names its model, how it becomes an engine request, and how engine events become this dialect's answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Optional

from starlette.requests import Request
from starlette.responses import Response

from mlx_server.api.context import AppContext, Collected
from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.events import Event
from mlx_server.contract.requests import EngineRequest, Priority
from mlx_server.models.info import ModelInfo

log = logging.getLogger("mlx_server.api")

TOOLS_IGNORED_HEADER = "X-MLX-Tools-Ignored"
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Incoming:
    """One HTTP request on a generation route, with its model resolved: what a dialect's `build` reads."""

    ctx: AppContext
    http: Request
    body: dict[str, Any]
    requested: str  # the model as the client named it; answers echo it
    name: str  # the configured model it resolved to
    info: Optional[ModelInfo]  # what the model's files say it can do (None when unreadable)
    arrival: float  # time.monotonic() when the request arrived: every engine request's `created`

    @property
    def model_options(self) -> dict[str, Any]:
        return dict(self.ctx.config.models[self.name].options)

    @property
    def priority(self) -> Priority:
        return Priority.parse(self.http.headers.get("x-request-priority"))

    @property
    def timeout(self) -> Optional[float]:
        return self.ctx.config.server.request_timeout

    def tools_note(self, tools: Optional[list[dict[str, Any]]]) -> dict[str, str]:
        """Headers for a request offering tools the model has no format to call (tool choice left to the model).

        Such tools are still accepted, as clients like Open WebUI attach theirs to every chat and a 400 would
        break them, but the client and the log are told the model will not call them.
        """
        if not tools or self.info is None or "tools" in self.info.capabilities:
            return {}
        # Once per model, then counted: Open WebUI attaches its tools to every chat, which would flood the log.
        if self.name not in self.ctx.tools_warned:
            self.ctx.tools_warned.add(self.name)
            log.warning(
                "model %s has no tool-call format: requests' tools will not be called (this request: %d; further "
                "requests are counted in mlx_tools_ignored_total)",
                self.name,
                len(tools),
            )
        if self.ctx.metrics is not None:
            self.ctx.metrics.tools_ignored.labels(self.name).inc()
        return {TOOLS_IGNORED_HEADER: "model has no tool-call format"}


@dataclass
class Call:
    """What `build` made of a request: the engine request, and how the answer must be shaped."""

    request: EngineRequest
    stream: bool
    shape: Any = None  # dialect-specific answer settings, handed back to `encode` and `final`
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    needs_generation: bool = True  # False for a load or unload: any model may be warmed, embedders too


Target = Callable[[AppContext, dict[str, Any]], Awaitable[tuple[str, str]]]
Build = Callable[[Incoming], Call]
# `events` runs from the first event through Done or Failed; the skeleton closes it and logs the request.
# An async generator, not just an iterator: the route closes it (contextlib.aclosing) whatever ends the stream.
Encode = Callable[[Incoming, Call, AsyncIterator[Event]], AsyncGenerator[Any, None]]
Final = Callable[[Incoming, Call, Collected], dict[str, Any]]


def named_model(missing: str) -> Target:
    """The `target` of dialects whose body must name its model (`missing`: the 400 when it does not)."""

    async def target(ctx: AppContext, body: dict[str, Any]) -> tuple[str, str]:
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise BadRequest(missing)
        return requested, await ctx.resolve(requested)

    return target


@dataclass(frozen=True)
class Generation:
    target: Target  # (model as requested, configured model); a 404 for one not served here
    build: Build
    encode: Encode  # stream frames, in whatever form the dialect's `stream_response` sends
    final: Final  # the whole (non-streaming) answer as a JSON object
    # Ollama's word for the route when the model cannot generate: 400 `"m" does not support chat|generate`
    verb: str = "generate"


@dataclass(frozen=True)
class Endpoint:
    """One route: a generation route (`generation`) or any other (`handler`), and how others must treat it."""

    path: str
    methods: tuple[str, ...]
    summary: str  # for the OpenAPI document
    handler: Optional[Handler] = None
    generation: Optional[Generation] = None
    schema: Optional[str] = None  # name of its request body schema in the OpenAPI document
    names_model: bool = False  # a POST naming a model: the fallback proxies it when the model is not ours
    listing: bool = False  # a model listing: the fallback appends the upstream's models
    rate_limited: bool = False  # costs engine work: counted by the per-client rate limit
    upload: bool = False  # a raw body streamed to disk: capped by server.max_blob_bytes, not max_body_bytes
    streams: bool = False


@dataclass(frozen=True)
class Dialect:
    name: str
    prefixes: tuple[str, ...]  # its paths; errors under the longest matching prefix take its shape
    error_body: Callable[[MlxServerError], dict[str, Any]]
    http_error_body: Callable[[int, str], dict[str, Any]]  # for Starlette's own 404 / 405
    error_frame: Callable[[MlxServerError], bytes]  # one stream frame reporting an error, as raw wire bytes
    stream_response: Callable[[AsyncIterator[Any]], Response]
    error_schema: str  # name of its error body schema in the OpenAPI document
    endpoints: tuple[Endpoint, ...] = ()

    def owns(self, path: str) -> int:
        """Length of the prefix of `path` this dialect claims (0: none). A prefix is whole path segments."""
        return max(
            (len(p) for p in self.prefixes if path == p or path.startswith(p if p.endswith("/") else p + "/")),
            default=0,
        )


__all__ = ["Call", "Dialect", "Endpoint", "Generation", "Incoming", "TOOLS_IGNORED_HEADER", "named_model"]
