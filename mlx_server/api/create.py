"""/api/create and /api/copy in Ollama's shapes: new names for models, kept in the registry (models/registry.py).

The body is checked here, before anything streams, so a client's mistake is a plain 4xx; the building itself
(models/create.py) runs in a worker thread, its conversions in child processes, and streams Ollama's status lines
(`{"status": "..."}` … `{"status": "success"}`, or a last `{"error": ...}` line). A client that hangs up stops
the build. Names models.yaml gives (its keys and aliases) cannot be replaced: 409. A replaced created model is
unloaded first (409 while it serves) and its files are read again on next use.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlx_server.api.context import AppContext, ctx_of, field_type, read_json
from mlx_server.api.dialects.ollama_reply import line
from mlx_server.api.manage import unload
from mlx_server.config.tree import ModelConfig
from mlx_server.contract.errors import BadRequest, ModelExists, ModelNotFound
from mlx_server.models.blobs import parse_digest
from mlx_server.models.create import CreateError, Recipe, build
from mlx_server.models.ollama_store import OllamaError, defaults, read_manifest
from mlx_server.models.quantize import quant_mode
from mlx_server.models.registry import Created

log = logging.getLogger("mlx_server.api.create")

# Ollama's model names: [host/][namespace/]model[:tag].
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){0,2}(:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
# Go template actions ({{ .Prompt }}, {{ range .Messages }}, {{ if .System }}): Ollama's TEMPLATE language.
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(\.|range\b|if\s+\.|with\s+\.|end\b|template\b)")
_ROLES = ("system", "user", "assistant", "tool")


def model_name(body: dict[str, Any], key: str) -> str:
    """A new model name as Ollama stores it: `x` is `x:latest`."""
    name = field_type(body, key, str, "a string")
    if not name:
        raise BadRequest(f"{key} is required")
    name = name.strip()
    if len(name) > 350 or not _NAME.fullmatch(name):
        raise BadRequest(f'invalid model name "{name}": use [namespace/]model[:tag] with letters, digits, . _ -')
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def check_replaceable(ctx: AppContext, name: str) -> None:
    """409 for a name models.yaml gives (a key, an alias, or `x` for its `x:latest`)."""
    if ctx.engine.status().world is not None:
        raise BadRequest("create and copy are not available under serve --distributed: add the model to models.yaml")
    resolved = ctx.config.resolve(name)
    if resolved is not None and ctx.config.in_file(resolved):
        where = ctx.config.path or "models.yaml"
        raise ModelExists(f'model "{name}" is configured in {where}; choose another name (it cannot be replaced)')


async def _replace(ctx: AppContext, name: str) -> None:
    """Make way for a new `name`: unload the old one (409 while it serves) and forget its files."""
    if name in ctx.registry:
        await unload(ctx, name)
    ctx.engine.forget(name)
    ctx.catalog.invalidate(name)


# ---- /api/create ---------------------------------------------------------------------------------------------


async def create(request: Request) -> Response:
    ctx = ctx_of(request)
    body = await read_json(request)
    recipe = await _recipe(ctx, body)
    check_replaceable(ctx, recipe.name)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest('invalid value for field "stream": expected a boolean')
    await _replace(ctx, recipe.name)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    cancel = threading.Event()

    def report(status: str) -> None:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, status)
        except RuntimeError:  # the loop is gone (server stopping)
            pass

    task = asyncio.ensure_future(asyncio.to_thread(build, recipe, ctx.workshop, report, cancel))

    def built(_: object) -> None:  # whatever the outcome, the name's files may have changed
        ctx.engine.forget(recipe.name)
        ctx.catalog.invalidate(recipe.name)

    task.add_done_callback(built)
    if not stream:
        try:
            created = await task
        except CreateError as exc:
            raise BadRequest(str(exc)) from None
        _log_created(created)
        return JSONResponse({"status": "success"})
    return StreamingResponse(_stream(task, lines, cancel), media_type="application/x-ndjson")


async def _stream(
    task: "asyncio.Future[Created]", lines: "asyncio.Queue[str]", cancel: threading.Event
) -> AsyncIterator[bytes]:
    try:
        while not task.done():
            getter = asyncio.ensure_future(lines.get())
            either: set[asyncio.Future[Any]] = {getter, task}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield line({"status": getter.result()})
            else:
                getter.cancel()
        while not lines.empty():  # reports are queued on the loop before the worker's result is
            yield line({"status": lines.get_nowait()})
        try:
            created = task.result()
        except Exception as exc:  # noqa: BLE001 - any failure is the stream's last line, as Ollama's
            log.warning("create failed: %s", exc)
            yield line({"error": str(exc)})
            return
        _log_created(created)
        yield line({"status": "success"})
    finally:
        cancel.set()  # a client that hangs up stops the build; a finished one ignores this


def _log_created(created: Created) -> None:
    log.info("created model %s (%s)", created.name, created.model.source)


async def _recipe(ctx: AppContext, body: dict[str, Any]) -> Recipe:
    name = model_name(body, "model") if body.get("model") is not None else model_name(body, "name")
    if body.get("adapters"):
        raise BadRequest("adapters (LoRA) are not supported by this server's create")
    base_name = field_type(body, "from", str, "a string")
    files = await asyncio.to_thread(_files, ctx, body)  # each digest is a stat: off the event loop
    if base_name and files:
        raise BadRequest("give either from or files, not both")
    if not base_name and not files:
        raise BadRequest("from or files is required: the model to build on, or the uploaded files of a new one")
    base = await _base(ctx, base_name) if base_name else None
    quantize = field_type(body, "quantize", str, "a string")
    if quantize:
        try:
            quant_mode(quantize)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    template = field_type(body, "template", str, "a string")
    if template is not None and _GO_TEMPLATE.search(template):
        raise BadRequest(
            "template: Ollama's Go templates are not rendered by this server; send a Jinja chat template "
            "(as in tokenizer_config.json's chat_template), or leave template out to keep the model's own"
        )
    parameters = field_type(body, "parameters", dict, "an object") or {}
    license_ = body.get("license")
    if license_ is not None and not (
        isinstance(license_, str) or (isinstance(license_, list) and all(isinstance(x, str) for x in license_))
    ):
        raise BadRequest('invalid value for field "license": expected a string or a list of strings')
    return Recipe(
        name=name,
        base=base,
        files=files,
        quantize=quantize or None,
        system=field_type(body, "system", str, "a string"),
        template=template,
        parameters=parameters,
        messages=_messages(body),
        license=None if license_ is None else ((license_,) if isinstance(license_, str) else tuple(license_)),
    )


def _files(ctx: AppContext, body: dict[str, Any]) -> dict[str, str]:
    files = field_type(body, "files", dict, "an object of file name to blob digest") or {}
    out: dict[str, str] = {}
    for filename, digest in files.items():
        if not isinstance(digest, str):
            raise BadRequest(f'invalid value for files["{filename}"]: expected a digest string')
        try:
            hexdigest = parse_digest(digest)
        except ValueError as exc:
            raise BadRequest(f'files["{filename}"]: {exc}') from None
        if not ctx.blobs.exists(hexdigest):
            raise BadRequest(f"blob sha256:{hexdigest} ({filename}) has not been uploaded: POST it to /api/blobs")
        out[filename] = hexdigest
    return out


def _messages(body: dict[str, Any]) -> Optional[tuple[dict[str, Any], ...]]:
    messages = field_type(body, "messages", list, "a list of messages")
    if messages is None:
        return None
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content", ""), str):
            raise BadRequest(f"messages[{i}]: expected {{role: system|user|assistant|tool, content: string}}")
        out.append({"role": m["role"], "content": m.get("content", "")})
    return tuple(out)


async def _base(ctx: AppContext, requested: str) -> ModelConfig:
    """`from`: a model served here, else one in the Ollama store (its params and system layers included)."""
    name = ctx.config.resolve(requested)
    if name is not None:
        return ctx.config.models[name]
    source = f"ollama:{requested}"
    try:
        await asyncio.to_thread(read_manifest, source)
    except OllamaError:
        raise ModelNotFound(requested) from None
    options, system = await asyncio.to_thread(defaults, source)
    return ModelConfig(source=source, options=options, system=system).renamed(requested)


# ---- /api/copy -----------------------------------------------------------------------------------------------


async def copy(request: Request) -> Response:
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = field_type(body, "source", str, "a string")
    if not requested:
        raise BadRequest("source is required")
    destination = model_name(body, "destination")
    source = ctx.config.resolve(requested)
    if source is None:
        raise ModelNotFound(requested)
    check_replaceable(ctx, destination)
    if ctx.config.resolve(destination) == source:
        raise BadRequest(f'"{requested}" and "{destination}" name the same model')
    await _replace(ctx, destination)
    original = ctx.registry.get(source)
    model = ctx.config.models[source].model_copy(update={"aliases": (), "preload": False}).renamed(destination)
    copied = Created(
        model=model,
        owned=original.owned if original is not None else None,  # the weights are shared, not copied
        blobs=original.blobs if original is not None else (),
        created_at=time.time(),
    )
    await asyncio.to_thread(ctx.registry.put, copied)
    ctx.catalog.invalidate(destination)
    log.info("copied model %s to %s", source, destination)
    return Response(status_code=200)
