"""/api/pull and /api/delete: get a configured model's weights onto disk, or remove them, in Ollama's shapes.

Only configured models can be pulled (models.yaml is the catalogue). Downloads run in a worker thread via
mlx_server.models.pull and never touch MLX; progress crosses back to the event loop as queued dicts. Deleting a
created model (/api/create, /api/copy) removes its registry entry and whatever it alone used; deleting a
models.yaml model removes only weights this server downloaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlx_server.api.context import AppContext, ctx_of, field_type, read_json
from mlx_server.api.dialects.ollama import line
from mlx_server.contract.errors import BadRequest, ModelBusy, ModelNotFound, PullFailed
from mlx_server.contract.events import Done, Failed
from mlx_server.contract.requests import UnloadRequest
from mlx_server.models.pull import FileProgress, NotManaged, PullResult, check_managed, delete_local, ensure_local

log = logging.getLogger("mlx_server.api.manage")


def _requested(body: dict[str, Any]) -> str:
    requested = field_type(body, "model", str, "a string") or field_type(body, "name", str, "a string")
    if not requested:
        raise BadRequest("model is required")
    return requested


def _configured(ctx: AppContext, requested: str, pulling: bool = False) -> str:
    name = ctx.config.resolve(requested)
    if name is None:
        where = ctx.config.path or "models.yaml"
        hint = (
            f"only models configured in {where} can be pulled: add it under models: with a source (a Hugging Face "
            f'repo id, a local path, or ollama:NAME for a model in the Ollama store), e.g. "{requested}": '
            "{source: mlx-community/...}, then restart"
        )
        raise ModelNotFound(requested, hint if pulling else "")
    return name


def _config_dir(ctx: AppContext) -> Optional[Path]:
    return ctx.config.path.parent if ctx.config.path else None


def _progress_line(p: FileProgress) -> dict[str, Any]:
    # Ollama names a layer by the first 12 hex digits of its digest in the status text.
    return {
        "status": f"pulling {p.digest.removeprefix('sha256:')[:12]}",
        "digest": p.digest,
        "total": p.total,
        "completed": p.completed,
    }


async def pull(request: Request) -> Response:
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = _requested(body)
    name = _configured(ctx, requested, pulling=True)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest('invalid value for field "stream": expected a boolean')
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def report(p: FileProgress) -> None:
        try:
            loop.call_soon_threadsafe(progress.put_nowait, _progress_line(p))
        except RuntimeError:  # the loop is gone (server stopping); the download result is all that matters
            pass

    task = asyncio.ensure_future(
        asyncio.to_thread(
            ensure_local,
            ctx.config.models[name],
            _config_dir(ctx),
            update=True,
            progress=report,
            cancel=cancel,
            cache_dir=ctx.config.server.cache_dir,
        )
    )
    # Whatever the outcome (done, failed, cancelled half-way) the files may have changed: look again next time.
    task.add_done_callback(lambda _: ctx.catalog.invalidate(name))
    if not stream:
        result = await task
        _log_result(result)
        if not result.ok:
            raise PullFailed(f'pulling model "{requested}" failed: {result.error}')
        return JSONResponse({"status": "success"})
    return StreamingResponse(_stream(task, progress, cancel, requested), media_type="application/x-ndjson")


async def _stream(
    task: "asyncio.Future[PullResult]",
    progress: "asyncio.Queue[dict[str, Any]]",
    cancel: threading.Event,
    requested: str,
) -> AsyncIterator[bytes]:
    try:
        yield line({"status": "pulling manifest"})
        while not task.done():
            getter = asyncio.ensure_future(progress.get())
            either: set[asyncio.Future[Any]] = {getter, task}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield line(getter.result())
            else:
                getter.cancel()
        # Progress reports are scheduled on the loop before the worker's result is, so they are all queued now.
        while not progress.empty():
            yield line(progress.get_nowait())
        result = task.result()
        _log_result(result)
        if result.ok:
            yield line({"status": "verifying sha256 digest"})
            yield line({"status": "success"})
        else:
            yield line({"error": f'pulling model "{requested}" failed: {result.error}'})
    finally:
        # A client that hangs up stops the download at its next chunk; finished pulls ignore this.
        cancel.set()


def _log_result(result: PullResult) -> None:
    if result.ok:
        log.info("pull %s: %s (%s)", result.name, result.path, "downloaded" if result.downloaded else "up to date")
    else:
        log.warning("pull %s failed: %s", result.name, result.error)


async def unload(ctx: AppContext, name: str) -> None:
    """Unload `name` through the engine (an unload-only request) so its files can go; 409 while in use."""
    if not any(r.name == name for r in ctx.engine.status().models):
        return
    events = ctx.engine.stream(UnloadRequest(name))
    try:
        async for event in events:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Done):
                break
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if any(r.name == name for r in ctx.engine.status().models):
        raise ModelBusy(f'model "{name}" is in use; retry when its requests have finished')


async def delete(request: Request) -> Response:
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = _requested(body)
    name = _configured(ctx, requested)
    if name in ctx.registry:
        await unload(ctx, name)
        try:
            await asyncio.to_thread(ctx.registry.remove, name)  # and its files, unless a copy still uses them
        finally:
            ctx.engine.forget(name)
            ctx.catalog.invalidate(name)
        log.info("deleted created model %s", name)
        return Response(status_code=200)
    model = ctx.config.models[name]
    try:
        check_managed(model, _config_dir(ctx))
    except NotManaged as exc:
        raise BadRequest(str(exc)) from None
    await unload(ctx, name)
    try:
        removed = await asyncio.to_thread(delete_local, model, _config_dir(ctx))
    finally:
        ctx.catalog.invalidate(name)
    if not removed:
        raise ModelNotFound(requested)
    log.info("deleted the cached weights of %s (%s)", name, model.source)
    return Response(status_code=200)
