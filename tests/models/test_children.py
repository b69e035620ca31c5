"""models/children.py: conversion children, their report lines, results, failures and cancellation.

A small child module written into tmp_path (on the child's PYTHONPATH) plays each part; the GGUF import runs for
real on a tiny GGUF, through `import_gguf_child` and the engine's `import_in_child`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mlx_server.contract.errors import ModelLoadFailed
from mlx_server.engine.prepare.stage import import_in_child
from mlx_server.models import children
from mlx_server.models.children import ChildCancelled, ChildFailed, import_gguf_child, run_child
from support.gguf_builders import tiny_llama_gguf

CHILD = """
import os, signal, sys, time

def err(line):
    print(line, file=sys.stderr, flush=True)

part, *rest = sys.argv[1:]
if part == "ok":
    err("one")
    err("")
    err("two")
    print("some chatter")
    print("/the/result")
    print("")
elif part == "wait":  # goes on only once the parent has seen its first line
    err("waiting")
    deadline = time.monotonic() + 20
    while not os.path.exists(rest[0]):
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.02)
    print("went on")
elif part == "fail":
    err("progress")
    err("Boom: broken")
    sys.exit(1)
elif part == "silent":
    sys.exit(int(rest[0]))
elif part == "noresult":
    err("did nothing")
elif part == "sleep":
    err(f"pid {os.getpid()}")
    time.sleep(60)
elif part == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    err(f"pid {os.getpid()}")
    time.sleep(60)
elif part == "tidy":
    def stop(signum, frame):
        open(rest[0], "w").close()  # what a real child does here: remove its half-built dir
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    err("ready")
    time.sleep(60)
"""


@pytest.fixture
def child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of the fake child module, importable by the children run_child starts."""
    (tmp_path / "fakechild.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield "fakechild"


def test_result_is_stdouts_last_line_and_stderr_lines_are_reported(child: str) -> None:
    lines: list[str] = []
    assert run_child(child, ["ok"], on_line=lines.append) == "/the/result"
    assert lines == ["one", "two"]  # blank lines are not reported


def test_lines_arrive_while_the_child_runs(child: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    caller = threading.get_ident()
    seen: list[tuple[str, int]] = []

    def on_line(line: str) -> None:
        seen.append((line, threading.get_ident()))
        go.touch()

    assert run_child(child, ["wait", str(go)], on_line=on_line) == "went on"
    assert seen == [("waiting", caller)]  # in the caller's thread, before the child finished


def test_failure_says_the_last_stderr_line_or_the_exit_status(child: str) -> None:
    lines: list[str] = []
    with pytest.raises(ChildFailed) as failed:
        run_child(child, ["fail"], on_line=lines.append)
    assert failed.value.message == str(failed.value) == "Boom: broken" and failed.value.returncode == 1
    assert lines == ["progress", "Boom: broken"]
    with pytest.raises(ChildFailed, match=r"^exit 4$"):
        run_child(child, ["silent", "4"])
    with pytest.raises(ChildFailed, match="printed no result"):
        run_child(child, ["noresult"])
    with pytest.raises(ChildFailed, match="No module named"):
        run_child("no_such_module_here", [])


def _cancel_on_first_line(cancel: threading.Event, pids: list[int]) -> children.OnLine:
    def on_line(line: str) -> None:
        if line.startswith("pid "):
            pids.append(int(line.split()[1]))
        cancel.set()

    return on_line


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cancel_stops_the_child_and_raises(child: str) -> None:
    cancel, pids = threading.Event(), []
    started = time.monotonic()
    with pytest.raises(ChildCancelled, match="cancelled"):
        run_child(child, ["sleep"], on_line=_cancel_on_first_line(cancel, pids), cancel=cancel)
    assert time.monotonic() - started < 10 and pids and _gone(pids[0])


def test_cancel_terminates_first_so_the_child_can_clean_up(child: str, tmp_path: Path) -> None:
    cancel, cleaned = threading.Event(), tmp_path / "cleaned"
    with pytest.raises(ChildCancelled):
        run_child(child, ["tidy", str(cleaned)], on_line=lambda _: cancel.set(), cancel=cancel)
    assert cleaned.exists()


def test_a_child_deaf_to_sigterm_is_killed_after_the_grace(child: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(children, "_KILL_GRACE", 0.3)
    cancel, pids = threading.Event(), []
    started = time.monotonic()
    with pytest.raises(ChildCancelled):
        run_child(child, ["stubborn"], on_line=_cancel_on_first_line(cancel, pids), cancel=cancel)
    assert time.monotonic() - started < 10 and _gone(pids[0])


def test_an_on_line_that_raises_stops_the_child(child: str) -> None:
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line.split()[1]))
        raise KeyError("the client went away")

    with pytest.raises(KeyError):
        run_child(child, ["sleep"], on_line=on_line)
    assert _gone(pids[0])


def test_gguf_import_in_a_child(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    lines: list[str] = []
    model_dir = import_gguf_child(gguf, tmp_path / "cache", on_line=lines.append)
    assert model_dir.parent == tmp_path / "cache" / "imports" and (model_dir / "config.json").is_file()
    assert any(line.startswith("GGUF import (llama") for line in lines)
    # The engine's import goes the same way, its report logged at INFO; the cached import comes back at once.
    with caplog.at_level(logging.INFO, logger="mlx_server.engine.prepare.stage"):
        assert import_in_child(gguf, tmp_path / "cache") == model_dir
    assert any(r.getMessage().startswith("tiny.gguf: GGUF import (llama") for r in caplog.records)


def test_a_failed_gguf_import_is_a_model_load_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 64)
    with pytest.raises(ModelLoadFailed, match=r"^importing bad\.gguf failed: \w+Error: ") as failed:
        import_in_child(bad, tmp_path / "cache")
    assert "exit" not in str(failed.value)
