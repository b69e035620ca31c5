"""Conversions in child processes: the server's own processes never run them (no MLX here).

Converting uses MLX, which only the inference thread may touch in the server, and takes seconds to minutes of CPU
and disk that must not stall the event loop; so GGUF import (convert/gguf.py) and quantization
(convert/quantize.py) run as `python -m MODULE ARGS`. Their protocol: report lines on stderr, one per line, as they
go (the caller logs them or turns them into status lines); the result, a path, on stdout's last line; exit 0, or
nonzero with the reason as stderr's last line.

`run_child` blocks (callers run it in a worker thread) and calls `on_line` in the calling thread. A set `cancel`
(the client went away) stops the child: SIGTERM first, so it can remove its half-built dir, then SIGKILL after a
grace period; what a killed child leaves, its next run (or `quantize_child` here) removes (models/tmpdirs.py).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Callable, Optional, Sequence

from mlx_server.models.quantize import QuantMode
from mlx_server.models.tmpdirs import remove_leftovers

OnLine = Callable[[str], None]

_POLL = 0.1  # seconds between looks at `cancel`
_KILL_GRACE = 5.0  # seconds a cancelled child gets to clean up after SIGTERM before SIGKILL
_JOIN = 5.0  # seconds to wait for the pipes to drain once the child is gone


class ChildFailed(RuntimeError):
    """A conversion child exited nonzero; the message is its last stderr line (or its exit status)."""

    def __init__(self, message: str, returncode: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.returncode = returncode


class ChildCancelled(ChildFailed):
    """`cancel` was set: the child was stopped before it finished."""


def run_child(
    module: str,
    args: Sequence[str],
    on_line: Optional[OnLine] = None,
    cancel: Optional[threading.Event] = None,
) -> str:
    """Run `python -m module *args`; return stdout's last non-empty line, calling `on_line` with each stderr line.

    Raises ChildFailed on a nonzero exit (or no result), ChildCancelled when `cancel` is set while it runs. If
    `on_line` raises, the child is stopped and the exception passes on.
    """
    # UTF-8 both ways, surrogates kept: a path on stdout comes back exactly, whatever the locale.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        encoding="utf-8",
        errors="surrogateescape",
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[Optional[str]] = queue.Queue()
    result: deque[str] = deque(maxlen=1)
    readers = [
        threading.Thread(target=_pump, args=(proc.stderr, lines.put), name=f"{module}-stderr", daemon=True),
        threading.Thread(target=_pump, args=(proc.stdout, _keep(result)), name=f"{module}-stdout", daemon=True),
    ]
    for reader in readers:
        reader.start()
    last_error = ""
    try:
        stderr_open = True
        while stderr_open:  # stderr closes when the child exits
            _check(cancel, module)
            try:
                line = lines.get(timeout=_POLL)
            except queue.Empty:
                continue
            if line is None:
                stderr_open = False
            elif line:
                last_error = line
                if on_line is not None:
                    on_line(line)
        while True:
            try:
                returncode = proc.wait(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                _check(cancel, module)
    except BaseException:
        _stop(proc)
        raise
    finally:
        for reader in readers:
            reader.join(_JOIN)
        proc.stdout.close()
        proc.stderr.close()
    if returncode != 0:
        reason = last_error or (f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}")
        raise ChildFailed(reason, returncode)
    if not result:
        raise ChildFailed(f"{module} printed no result", returncode)
    return result[0]


def import_gguf_child(
    gguf: Path, cache_dir: Path, on_line: Optional[OnLine] = None, cancel: Optional[threading.Event] = None
) -> Path:
    """Import a GGUF into `cache_dir/imports` (once: a cached import returns at once); return its model dir.

    `on_line` gets the import's report (architecture, chat template in use, requantization errors)."""
    return Path(run_child("mlx_server.convert.gguf", [str(gguf), str(cache_dir)], on_line, cancel))


def quantize_child(
    src: Path, out: Path, mode: QuantMode, on_line: Optional[OnLine] = None, cancel: Optional[threading.Event] = None
) -> Path:
    """Quantize the float model dir `src` into the model dir `out` (built beside it, renamed into place); return
    `out`. `on_line` gets the progress lines. An `out` already complete is returned as it is."""
    args = [str(src), str(out), str(mode.bits), str(mode.group_size)]
    try:
        return Path(run_child("mlx_server.convert.quantize", args, on_line, cancel))
    except ChildFailed:
        # A child killed before it could clean up leaves its build dir; nothing else builds there now unless
        # remove_leftovers finds the dir locked, and then that build removes them itself.
        remove_leftovers(out)
        raise


def _pump(stream: IO[str], put: Callable[[Optional[str]], None]) -> None:
    for line in stream:
        put(line.rstrip())
    put(None)


def _keep(last: deque[str]) -> Callable[[Optional[str]], None]:
    def put(line: Optional[str]) -> None:
        if line:  # blank lines and the end-of-stream mark are not results
            last.append(line)

    return put


def _check(cancel: Optional[threading.Event], module: str) -> None:
    if cancel is not None and cancel.is_set():
        raise ChildCancelled(f"{module} was cancelled")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=_KILL_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


__all__ = ["ChildCancelled", "ChildFailed", "OnLine", "import_gguf_child", "quantize_child", "run_child"]
