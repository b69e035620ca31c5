"""A real uvicorn server on a free loopback port, running the real app, for tests that speak HTTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import uvicorn
import yaml

from mlx_server.config.load import Config, build_config
from mlx_server.models.ollama_store import defaults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P and P+1 free: mlx.launch's ring backend listens on one port per rank from P."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def start_group(tmp: Path, models: dict, *extra: str, ranks: int = 2, log: Optional[Path] = None,
                **server: object) -> tuple[subprocess.Popen, str]:
    """`mlx.launch --backend ring` running `mlx-server serve --distributed` on `ranks` local ranks; returns the
    launcher and rank 0's URL once /health answers with every rank seen."""
    port = free_port()
    cfg = tmp / "models.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": port, "memory_budget": "4GB", "cache_dir": str(tmp / "c"),
                                              **server}, "models": models}))
    launcher = Path(sys.executable).parent / "mlx.launch"
    proc = subprocess.Popen(
        [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks), "--starting-port",
         str(free_port_pair()), "--", sys.executable, "-m", "mlx_server", "--config", str(cfg), "serve",
         "--distributed", *extra],
        stdout=open(log or tmp / "group.log", "w"), stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            health = httpx.get(f"{url}/health", timeout=1)
            body = health.json()
            if body.get("status") == "healthy" and len(body.get("distributed", {}).get("ranks", [])) == ranks:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_group(proc)
    raise RuntimeError((log or tmp / "group.log").read_text()[-3000:])


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the launcher and every rank it started (they share its process group)."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def make_config(tmp: Path, models: dict[str, Any], **server: Any) -> Config:
    """Write a models.yaml into tmp and load it the way the CLI does."""
    doc = {"server": {"memory_budget": "8GB", "keep_alive": "5m", "cache_dir": str(tmp / "cache"), **server},
           "models": models}
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    return build_config(yaml.safe_load(path.read_text()), path=path, env={}, layers=defaults)


class Server:
    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def engine(self) -> Any:
        return self.app.state.ctx.engine

    def start(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)


@contextlib.contextmanager
def serve(config: Config, engine: Optional[Any] = None) -> Iterator[Server]:
    from mlx_server.serve import build_app  # here, so engine-only tests never import the API

    server = Server(build_app(config, engine=engine), free_port()).start()
    try:
        yield server
    finally:
        server.stop()


def start_process(tmp: Path, models: dict, *extra: str, log: Optional[Path] = None,
                  **server: object) -> tuple[subprocess.Popen, str]:
    """`mlx-server serve` as a real process on a free port; returns it and its URL once /health answers.

    Its output is a pipe the caller reads at the end, or `log` — a server that logs a lot (a load test) would
    fill the pipe and block on its next log line."""
    port = free_port()
    cfg = tmp / "models.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": port, "memory_budget": "4GB", "cache_dir": str(tmp / "c"),
                                              **server}, "models": models}))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_server", "--config", str(cfg), "serve", *extra],
                            stdout=open(log, "w") if log else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stdout.read() if proc.stdout else "server did not start")
