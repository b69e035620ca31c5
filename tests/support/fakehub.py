"""A minimal stand-in for the Hugging Face Hub's HTTP API, served from local model folders.

It answers the calls huggingface_hub makes to fetch a model repo (model info with file metadata, recursive
tree, HEAD and ranged GET of /resolve/), so downloads, progress and resume run through the real client with no
network. `delay` slows file bodies so a test can hang up halfway; `gets` records every body request.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    root: Path
    commit: str = COMMIT

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    chunk: int = 64 * 1024
    delay: float = 0.0  # seconds slept between chunks
    gets: list[str] = field(default_factory=list)  # "repo/file bytes=N-" for every GET, for assertions
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = Repo(folder)

    def _repo(self, request: Request) -> Optional[Repo]:
        return self.repos.get(f"{request.path_params['org']}/{request.path_params['name']}")

    async def revision(self, request: Request) -> Response:
        repo = self._repo(request)
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        rid = f"{request.path_params['org']}/{request.path_params['name']}"
        return JSONResponse({"id": rid, "modelId": rid, "sha": repo.commit, "private": False,
                             "siblings": [self._sibling(repo, p) for p in repo.files()]})

    @staticmethod
    def _sibling(repo: Repo, path: Path) -> dict[str, Any]:
        """What the Hub lists per file with ?blobs=true: size, git blob id, and LFS sha256 for weights."""
        data = path.read_bytes()
        entry: dict[str, Any] = {"rfilename": repo.rel(path), "size": len(data),
                                 "blobId": hashlib.sha1(data).hexdigest()}
        if path.suffix == ".safetensors":
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return entry

    async def tree(self, request: Request) -> Response:
        repo = self._repo(request)
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        out: list[dict[str, Any]] = []
        for p in repo.files():
            data = p.read_bytes()
            entry: dict[str, Any] = {"type": "file", "path": repo.rel(p), "size": len(data),
                                     "oid": hashlib.sha1(data).hexdigest()}
            if p.suffix == ".safetensors":
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
            out.append(entry)
        return JSONResponse(out)

    async def resolve(self, request: Request) -> Response:
        repo = self._repo(request)
        path = repo.root / request.path_params["path"] if repo else None
        if repo is None or path is None or not path.is_file():
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return Response(status_code=200, headers={**headers, "Content-Length": str(len(data))})
        start = 0
        rng = request.headers.get("range", "")
        if rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0] or 0)
        with self.lock:
            self.gets.append(f"{request.path_params['name']}/{repo.rel(path)} bytes={start}-")
        body = data[start:]

        async def chunks() -> Iterator[bytes]:
            import asyncio

            for i in range(0, len(body), self.chunk):
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield body[i:i + self.chunk]

        status = 206 if start else 200
        headers["Content-Length"] = str(len(body))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        return StreamingResponse(chunks(), status_code=status, headers=headers)  # type: ignore[arg-type]

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/models/{org}/{name}", self.revision, methods=["GET"]),
            Route("/api/models/{org}/{name}/revision/{rev}", self.revision, methods=["GET"]),
            Route("/api/models/{org}/{name}/tree/{rev}", self.tree, methods=["GET"]),
            Route("/{org}/{name}/resolve/{rev}/{path:path}", self.resolve, methods=["GET", "HEAD"]),
        ])
