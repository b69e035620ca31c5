"""HEAD and POST /api/blobs/sha256:<hex>: the uploads `ollama create` (and ollama-python's `create_blob`) makes
before naming the files of a new model, answered as Ollama answers them.

HEAD: 200 when the blob is stored, 404 when not. POST: the raw body is streamed to disk through the store
(models/blobs.py), hashed as it is written, and kept only when it hashes to the digest in the path: 201 stored,
200 already stored (the body is read and dropped, not stored again), 400 a bad digest or a mismatch, 413 over
`server.max_blob_bytes`, 507 not enough disk space. The body is never held whole: it is written in batches of about
a MiB, each in a worker thread, so neither the disk nor the hashing ever blocks the event loop. Security
(api/security.py) caps these bodies at `max_blob_bytes` instead of `max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from mlx_server.api.context import ctx_of
from mlx_server.contract.errors import BadRequest, NotFound
from mlx_server.models.blobs import Upload, parse_digest

log = logging.getLogger("mlx_server.api.blobs")

BATCH = 1 << 20  # bytes per write: few thread hops, little memory


def _digest(request: Request) -> str:
    return parse_digest(request.path_params["digest"])  # BadDigest is a 400


def _announced(request: Request) -> Optional[int]:
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


async def head_blob(request: Request) -> Response:
    store = ctx_of(request).blobs
    hexdigest = _digest(request)
    if not await asyncio.to_thread(store.exists, hexdigest):
        raise NotFound(f'blob "sha256:{hexdigest}" not found')
    return Response(status_code=200)


async def create_blob(request: Request) -> Response:
    store = ctx_of(request).blobs
    hexdigest = _digest(request)
    if await asyncio.to_thread(store.exists, hexdigest):
        # Ollama answers without storing again. The body is read all the same: a server that closes on a client
        # still sending can reset the connection before the client reads the answer.
        await _drain(request)
        return Response(status_code=200)
    upload = await asyncio.to_thread(store.upload, hexdigest, _announced(request))
    try:
        await _receive(request, upload)
        await asyncio.to_thread(upload.finish)
    except ClientDisconnect:
        raise BadRequest(f"upload of sha256:{hexdigest} ended early: the client disconnected") from None
    finally:
        await _discard(upload)
    log.info("stored blob sha256:%s (%d bytes)", hexdigest, upload.written)
    return Response(status_code=201)


async def _receive(request: Request, upload: Upload) -> None:
    batch: list[bytes] = []
    pending = 0
    async with contextlib.aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            batch.append(chunk)
            pending += len(chunk)
            if pending >= BATCH:
                await asyncio.to_thread(upload.write, b"".join(batch))
                batch.clear()
                pending = 0
    if pending:
        await asyncio.to_thread(upload.write, b"".join(batch))


async def _drain(request: Request) -> None:
    with contextlib.suppress(ClientDisconnect):
        async with contextlib.aclosing(request.stream()) as chunks:
            async for _ in chunks:
                pass


async def _discard(upload: Upload) -> None:
    """Remove an unfinished upload's partial file (nothing once it is finished)."""
    if upload.settled:
        return
    try:
        await asyncio.to_thread(upload.abort)
    except BaseException:
        upload.abort()  # cancelled meanwhile (the server stopping): a short wait here beats a file left behind
        raise


__all__ = ["BATCH", "create_blob", "head_blob"]
