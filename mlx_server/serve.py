"""Running the server process: logging, the start-up report, and graceful shutdown on SIGTERM / SIGINT.

Shutdown keeps listening so late clients get a clear 503 instead of a refused connection: new requests are
refused, in-flight ones get `server.shutdown_grace` seconds to finish, then the engine ends the rest (each
stream gets an error line), models are unloaded, and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from types import FrameType
from typing import Any, Optional

import uvicorn
from starlette.applications import Starlette

from mlx_server.api.app import create_app
from mlx_server.api.catalog import Catalog
from mlx_server.config.load import Config
from mlx_server.contract.status import EngineClient
from mlx_server.models.registry import Registry
from mlx_server.models.sources import locate

log = logging.getLogger("mlx_server")

BROKEN_LINGER = 5.0  # seconds rank 0 keeps answering (unhealthy, 503) after its group broke, before it exits


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def startup_report(config: Config) -> None:
    s = config.server
    log.info(
        "config %s; listening on %s:%d; memory budget %.1f GB (%s); up to %d models resident",
        config.path,
        s.host,
        s.port,
        s.memory_budget / 1e9,
        s.memory_budget_spec,
        s.max_loaded_models,
    )
    cfg_dir = config.path.parent if config.path else None
    for model in config.models.values():
        found = locate(model, cfg_dir)
        if found.present:
            log.info(
                "model %s: present (%s, %.2f GB)%s",
                model.name,
                found.kind,
                found.size / 1e9,
                " [preload]" if model.preload else "",
            )
        else:
            log.info("model %s: missing (%s)", model.name, found.hint)
    if s.host not in ("127.0.0.1", "localhost", "::1") and not s.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the server", s.host)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, grace: float, linger: float = 0.0) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace
        self.linger = linger  # distributed: how long a broken group keeps answering (unhealthy, 503) before exit
        self._draining: Optional[threading.Thread] = None

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self._draining is not None:
            log.warning("second signal: exiting now")
            super().handle_exit(sig, frame)
            self.force_exit = True
            return
        log.info(
            "signal %d: refusing new requests; %d in flight get %.0fs to finish",
            sig,
            self.engine.status().in_flight,
            self.grace,
        )
        self.engine.drain()
        self._draining = threading.Thread(target=self._drain, name="shutdown-drain", daemon=True)
        self._draining.start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while self.engine.status().in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine.status().in_flight:
            log.warning("grace period over: ending %d requests", self.engine.status().in_flight)
        if self.linger and not self.engine.status().alive:
            time.sleep(self.linger)  # mlx.launch stops rank 0 the moment another rank dies: say why first
        self.engine.stop(timeout=30)  # fails what is left (error lines) and unloads every model
        self.should_exit = True


def build_app(config: Config, engine: Optional[EngineClient] = None, catalog: Optional[Catalog] = None) -> Starlette:
    """Where the API and the engine meet: the API holds the engine only as an `EngineClient`."""
    if engine is None:
        from mlx_server.engine.engine import Engine  # MLX is imported here, not by the API

        engine = checked(Engine(config))
    return create_app(config, engine, catalog)


def checked(engine: EngineClient) -> EngineClient:
    """The type checker holds Engine to the contract here (and tests/support/fakeengine.py holds the fake)."""
    return engine


def run(config: Config, log_level: str = "info", engine: Optional[EngineClient] = None, linger: float = 0.0) -> int:
    app = build_app(config, engine)
    engine = app.state.ctx.engine
    startup_report(config)
    uv_config = uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level=log_level.lower(),
        access_log=False,
        log_config=None,
    )
    server = GracefulServer(uv_config, engine, config.server.shutdown_grace, linger)
    server.run()
    return 0


def run_distributed(config: Config, log_level: str, backend: str, rank_timeout: float) -> int:
    """One rank of a group started by mlx.launch: rank 0 serves HTTP, the others run the same engine and follow it.

    A broken group (a rank died or hangs) ends every request with an error, and this process exits 1 a few
    seconds later (time for /health to say unhealthy and for late clients to get a 503), so the launcher exits
    and launchd restarts the whole group."""
    from mlx_server.engine.distributed.lockstep import Lockstep, init_group
    from mlx_server.engine.engine import Engine

    config.attach_created(Registry(config.server.cache_dir).models)  # every rank serves the created models
    group = init_group(backend)
    lockstep = Lockstep(group, backend_name(backend), timeout=rank_timeout)
    leader = lockstep.rank == 0

    def on_broken(why: str) -> None:
        threading.Timer(BROKEN_LINGER if leader else 0.0, os._exit, (1,)).start()

    engine = Engine(config, lockstep=lockstep, on_broken=on_broken)
    log.info(
        "rank %d of %d (%s backend)%s",
        lockstep.rank,
        lockstep.size,
        lockstep.backend,
        "" if leader else ": following rank 0, no HTTP",
    )
    if leader:
        code = run(config, log_level, engine, linger=BROKEN_LINGER)
        world = engine.status().world
        return 1 if world is not None and world.broken else code
    engine.start()
    engine.core.join()
    return 1 if engine.status().fatal else 0


def backend_name(backend: str) -> str:
    """What `any` resolved to, from what mlx.launch put in the environment."""
    if backend != "any":
        return backend
    if os.environ.get("MLX_IBV_DEVICES") or os.environ.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    if any(k.startswith("OMPI_") for k in os.environ):
        return "mpi"
    return "ring"
