"""Starting our server as a real process for the benchmark scripts: a models.yaml in `work`, a log file, /health."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import yaml


def start_server(
    work: Path, doc: dict[str, Any], port: int, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`mlx-server serve` on `doc` (a models.yaml document), once its /health answers: (process, URL, log)."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "models.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    log = work / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_server", "--config", str(cfg), "--log-level", "warning", "serve"],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=str(cwd) if cwd else None,
    )
    url = f"http://127.0.0.1:{port}"
    if wait_healthy(url, proc, 120):
        return proc, url, log
    raise RuntimeError(f"server did not come up (exit {proc.poll()}); see {log}")


def wait_healthy(url: str, proc: subprocess.Popen[Any], seconds: float) -> bool:
    """Whether `url`/health answered 200 within `seconds` (False at once if the process exited)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def stop_server(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
