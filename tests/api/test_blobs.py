"""HEAD and POST /api/blobs/sha256:<hex> on a real server, driven by ollama-python's create_blob, httpx and raw
sockets (for announced sizes without a body, and for a client that hangs up mid-upload)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx
import ollama
import pytest

from mlx_server.api.blobs import BATCH
from support.fakeengine import FakeEngine
from support.serving import Server, make_config, serve

MAX_BODY = 64 * 1024
MAX_BLOB = 4 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("blobs")
    config = make_config(tmp, {}, max_body_bytes=MAX_BODY, max_blob_bytes=MAX_BLOB)
    with serve(config, engine=FakeEngine()) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def root_of(server: Server) -> Path:
    return server.app.state.ctx.blobs.root


def partials(server: Server) -> list[Path]:
    root = root_of(server)
    return sorted(p for p in root.iterdir() if p.name.endswith(".partial")) if root.exists() else []


def blob_file(tmp_path: Path, size: int, name: str = "model.bin") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def url(hexdigest: str) -> str:
    return f"/api/blobs/sha256:{hexdigest}"


def wait_until(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def announce(server: Server, path: str, length: int) -> tuple[int, bytes]:
    """Send only a request head announcing `length` bytes; the status and body of the answer that comes first."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
            part = sock.recv(65536)
            if not part:
                break
            raw += part
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), body


def _length(raw: bytes) -> int:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    return 0


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body without Content-Length (chunked transfer encoding)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_ollama_create_blob_then_head(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    # 3 MiB: far over max_body_bytes, under max_blob_bytes
    path, hexdigest = blob_file(tmp_path, 3 * 2**20)
    assert client.head(url(hexdigest)).status_code == 404
    digest = ollama.Client(host=server.url).create_blob(path)
    assert digest == f"sha256:{hexdigest}"
    assert client.head(url(hexdigest)).status_code == 200
    assert client.head(f"/api/blobs/sha256-{hexdigest.upper()}").status_code == 200  # Ollama's file form too
    stored = server.app.state.ctx.blobs.path(hexdigest)
    assert stored == root_of(server) / f"sha256-{hexdigest}" and stored.read_bytes() == path.read_bytes()
    assert partials(server) == []


def test_async_client_streams_without_content_length(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    path, hexdigest = blob_file(tmp_path, 2 * 2**20 + 17)
    digest = asyncio.run(ollama.AsyncClient(host=server.url).create_blob(path))  # a generator body: chunked
    assert digest == f"sha256:{hexdigest}" and client.head(url(hexdigest)).status_code == 200
    data = os.urandom(MAX_BODY * 3)
    r = client.post(url(hashlib.sha256(data).hexdigest()), content=chunks(data, 1000))
    assert r.status_code == 201, r.text


def test_head_unknown_and_bad_digests(client: httpx.Client) -> None:
    assert client.head(url("ab" * 32)).status_code == 404
    for bad in ("sha256:xyz", "sha256:" + "a" * 63, "md5:" + "a" * 64, "a" * 64):
        assert client.head(f"/api/blobs/{bad}").status_code == 400, bad
        r = client.post(f"/api/blobs/{bad}", content=b"data")
        assert r.status_code == 400 and "invalid digest format" in r.json()["error"], (bad, r.text)


def test_mismatch_is_400_naming_both_and_leaves_nothing(server: Server, client: httpx.Client) -> None:
    data = os.urandom(MAX_BODY * 2)
    claimed = hashlib.sha256(b"other").hexdigest()
    r = client.post(url(claimed), content=data)
    assert r.status_code == 400
    actual = hashlib.sha256(data).hexdigest()
    assert r.json() == {"error": f'digest mismatch, expected "sha256:{claimed}", got "sha256:{actual}"'}
    assert not server.app.state.ctx.blobs.exists(claimed) and not server.app.state.ctx.blobs.exists(actual)
    assert partials(server) == []


def test_already_present_is_200_and_not_stored_again(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    path, hexdigest = blob_file(tmp_path, 300_000)
    assert client.post(url(hexdigest), content=path.read_bytes()).status_code == 201
    stored = server.app.state.ctx.blobs.path(hexdigest)
    before = stored.stat()
    r = client.post(url(hexdigest), content=path.read_bytes())
    assert r.status_code == 200 and r.content == b""
    assert ollama.Client(host=server.url).create_blob(path) == f"sha256:{hexdigest}"
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert partials(server) == []


def test_too_large_announced_or_streamed_is_413(server: Server, client: httpx.Client) -> None:
    hexdigest = "cd" * 32
    status, body = announce(server, url(hexdigest), MAX_BLOB + 1)
    assert status == 413 and b"max_blob_bytes" in body, body
    data = b"y" * (MAX_BLOB + 1024)  # just over: the server reads (nearly) all of it before refusing
    r = client.post(url(hashlib.sha256(data).hexdigest()), content=chunks(data))
    assert r.status_code == 413 and "max_blob_bytes" in r.json()["error"], r.text
    assert partials(server) == [] and not server.app.state.ctx.blobs.exists(hashlib.sha256(data).hexdigest())
    exact = b"z" * MAX_BLOB  # the limit itself is allowed
    assert client.post(url(hashlib.sha256(exact).hexdigest()), content=exact).status_code == 201


@pytest.fixture
def free_space(server: Server) -> Iterator[list[int]]:
    """The server's free-space check, answering from a list: [bytes] for every call, or one per call in order."""
    answers: list[int] = []
    store = server.app.state.ctx.blobs
    real = store.free_space

    def fake(path: Path) -> int:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    store.free_space = fake
    try:
        yield answers
    finally:
        store.free_space = real


def test_full_disk_is_507_and_leaves_nothing(server: Server, client: httpx.Client, free_space: list[int]) -> None:
    free_space.append(0)
    hexdigest = "ef" * 32
    status, body = announce(server, url(hexdigest), 1000)
    assert status == 507 and b"not enough disk space" in body, body
    r = client.post(url(hexdigest), content=chunks(b"q" * 5000))
    assert r.status_code == 507 and "not enough disk space" in r.json()["error"]
    assert partials(server) == []

    # Room at the start, none left by the first write (someone else filled the disk): still 507, nothing left.
    free_space[:] = [1 << 40, 0]
    data = b"w" * 2**20  # one write batch, so the server has read it all when it refuses
    r = client.post(url(hashlib.sha256(data).hexdigest()), content=chunks(data))
    assert r.status_code == 507 and "not enough disk space" in r.json()["error"], r.text
    assert partials(server) == [] and not server.app.state.ctx.blobs.exists(hashlib.sha256(data).hexdigest())


def test_client_leaving_mid_upload_leaves_nothing(server: Server, client: httpx.Client) -> None:
    data = os.urandom(MAX_BLOB)
    hexdigest = hashlib.sha256(data).hexdigest()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        head = f"POST {url(hexdigest)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode())
        sock.sendall(data[: 3 * 2**20 // 2])  # past one write batch: bytes are on disk
        wait_until(lambda: partials(server))
        assert client.head(url(hexdigest)).status_code == 404  # nothing visible under its name meanwhile
        time.sleep(0.2)
    wait_until(lambda: not partials(server))
    assert not server.app.state.ctx.blobs.exists(hexdigest)
    assert client.post(url(hexdigest), content=data).status_code == 201  # and the server still takes uploads


def test_uploads_need_the_api_key(tmp_path: Path) -> None:
    config = make_config(tmp_path, {}, api_key="s3cret")
    with serve(config, engine=FakeEngine()) as s:
        path, hexdigest = blob_file(tmp_path, 100_000)
        r = httpx.post(f"{s.url}{url(hexdigest)}", content=path.read_bytes())
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.head(f"{s.url}{url(hexdigest)}").status_code == 401
        assert not s.app.state.ctx.blobs.root.exists()
        client = ollama.Client(host=s.url, headers={"Authorization": "Bearer s3cret"})
        assert client.create_blob(path) == f"sha256:{hexdigest}"
        assert httpx.head(f"{s.url}{url(hexdigest)}", headers={"x-api-key": "s3cret"}).status_code == 200


def test_written_in_batches_never_held_whole(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    store = server.app.state.ctx.blobs
    writes: list[int] = []
    real_upload = store.upload

    def recording(hexdigest: str, size: Optional[int] = None) -> Any:
        upload = real_upload(hexdigest, size)
        real_write = upload.write

        def write(data: bytes) -> None:
            writes.append(len(data))
            real_write(data)

        upload.write = write
        return upload

    store.upload = recording
    try:
        path, hexdigest = blob_file(tmp_path, 3 * BATCH + 5)
        assert ollama.Client(host=server.url).create_blob(path) == f"sha256:{hexdigest}"
    finally:
        del store.upload  # the class's method again
    assert sum(writes) == 3 * BATCH + 5 and len(writes) >= 3
    assert max(writes) < 2 * BATCH  # a batch, plus at most the one received chunk that filled it


def test_fallback_leaves_uploads_alone(tmp_path: Path) -> None:
    # The fallback buffers the bodies of model requests; an upload is none, so it streams past, even when the
    # fallback is set (here to a port nothing listens on) and the body is far over max_body_bytes.
    config = make_config(tmp_path, {}, fallback_url="http://127.0.0.1:9", max_body_bytes=MAX_BODY)
    with serve(config, engine=FakeEngine()) as s:
        path, hexdigest = blob_file(tmp_path, 2 * 2**20)
        assert ollama.Client(host=s.url).create_blob(path) == f"sha256:{hexdigest}"
        assert s.app.state.ctx.blobs.path(hexdigest).read_bytes() == path.read_bytes()
