"""What `mlx-server doctor` finds out about this machine: the interpreter and platform, MLX (in a child process),
who holds a port, and what answers over HTTP. Each probe returns data; checks.py and server.py turn data into rows.

Every outside command goes through one `Runner` (the launchd seam's shape), so tests can stand in for `sysctl` on
Linux; the platform itself is a value (`Platform`) for the same reason.
"""

from __future__ import annotations

import json
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import httpx

from mlx_server.ops.launchd import Runner, run_command

MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Platform:
    system: str  # platform.system(): "Darwin", "Linux"
    machine: str  # the interpreter's architecture: "arm64", "x86_64" (an x86_64 Python under Rosetta says x86_64)
    python: str  # sys.executable
    python_version: tuple[int, int, int]
    mac_version: str = ""  # "15.3.1" on macOS
    translated: Optional[bool] = None  # running under Rosetta 2 (sysctl.proc_translated); None when unknown
    apple_silicon: Optional[bool] = None  # the hardware is arm64, whatever the interpreter is

    @classmethod
    def current(cls, run: Runner = run_command) -> "Platform":
        system = platform.system()
        translated = apple = None
        if system == "Darwin":
            translated = sysctl_flag("sysctl.proc_translated", run)
            apple = sysctl_flag("hw.optional.arm64", run)
        v = sys.version_info
        return cls(
            system,
            platform.machine(),
            sys.executable,
            (v.major, v.minor, v.micro),
            platform.mac_ver()[0] if system == "Darwin" else "",
            translated,
            apple,
        )


def sysctl_flag(key: str, run: Runner = run_command) -> Optional[bool]:
    """A 0/1 sysctl; None when the key does not exist (proc_translated is absent on Intel Macs) or sysctl fails."""
    try:
        result = run(["sysctl", "-n", key])
    except (FileNotFoundError, OSError):
        return None
    text = (result.stdout or "").strip()
    if result.returncode != 0 or text not in ("0", "1"):
        return None
    return text == "1"


def mac_version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return ()


# ---- MLX, in a child ----------------------------------------------------------------------------------------


def run_probe(args: Sequence[str], timeout: float, python: Optional[str] = None) -> dict[str, Any]:
    """`python -m mlx_server.engine.probe ARGS`: its JSON answer, or {"error": ...} with what went wrong."""
    argv = [python or sys.executable, "-m", "mlx_server.engine.probe", *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout:.0f} s"}
    except OSError as exc:
        return {"error": str(exc)}
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        return answer
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    return {"error": f"exit status {result.returncode}: {' | '.join(tail) or 'no output'}"}


# ---- the port --------------------------------------------------------------------------------------------------


def connect_host(host: str) -> str:
    """Where to connect to reach a server bound to `host` (a wildcard bind answers on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def is_listening(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def port_owner(port: int, run: Runner = run_command) -> Optional[str]:
    """'NAME (pid N)' of the process listening on TCP `port`, when lsof or ss can tell; else None.

    Both only see other users' processes with privileges, so None means "the OS did not say", not "nobody".
    """
    if shutil.which("lsof"):
        try:
            result = run(["lsof", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fpc"])
        except OSError:
            result = None
        if result is not None and result.returncode == 0:
            pid = name = ""
            for line in result.stdout.splitlines():
                if line.startswith("p") and not pid:
                    pid = line[1:]
                elif line.startswith("c") and pid and not name:
                    name = line[1:]
            if pid:
                return f"{name or 'unknown'} (pid {pid})"
    if shutil.which("ss"):
        try:
            result = run(["ss", "-ltnpH", f"sport = :{port}"])
        except OSError:
            return None
        marker = 'users:(("'
        for line in result.stdout.splitlines():
            if marker in line:
                name, _, rest = line.split(marker, 1)[1].partition('"')
                pid = rest.partition("pid=")[2].split(",")[0].rstrip(")")
                return f"{name} (pid {pid})" if pid else name
    return None


# ---- HTTP --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: Optional[int]  # None: no HTTP answer
    body: Any = None  # parsed JSON, else the text
    error: str = ""


def get(url: str, timeout: float = 2.0, headers: Optional[dict[str, str]] = None) -> Answer:
    try:
        response = httpx.get(url, timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)), headers=headers)
    except httpx.HTTPError as exc:
        return Answer(None, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(response.status_code, body)


def is_us(health: Answer) -> bool:
    """Our /health: a JSON object with the fields only mlx-server's has."""
    body = health.body
    return isinstance(body, dict) and {"status", "queue_size", "models_cached", "memory"} <= set(body)


__all__ = [
    "Answer",
    "MIN_PYTHON",
    "Platform",
    "connect_host",
    "get",
    "is_listening",
    "is_us",
    "mac_version_tuple",
    "port_owner",
    "run_probe",
    "sysctl_flag",
]
