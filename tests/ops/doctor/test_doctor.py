"""`mlx-server doctor` under real conditions: a port held by a real socket, a missing model dir, a bad models.yaml,
a real second server as the fallback (up, then down), the launchd command seam, and macOS / Rosetta described by a
`Platform` value plus a stub `sysctl` on PATH. `--json` is validated against docs/doctor.schema.json.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import jsonschema
import pytest

from mlx_server.api.dialects.ollama import OLLAMA_VERSION
from mlx_server.cli import main
from mlx_server.models.diagnose import ProblemCache, locate_quick, model_problems
from mlx_server.ops.doctor.checks import mlx_check, model_checks, platform_checks
from mlx_server.ops.doctor.probes import Platform, sysctl_flag
from mlx_server.ops.doctor.report import Machine
from mlx_server.ops.doctor.server import launchd_checks
from mlx_server.ops.launchd import Agent, Host, Launchctl
from support.serving import free_port, make_config, serve

SCHEMA = json.loads((Path(__file__).resolve().parents[3] / "docs" / "doctor.schema.json").read_text())


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    status = main(["doctor", "--config", str(config), "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    jsonschema.validate(report, SCHEMA)
    assert report["exit_status"] == status
    return status, report


def row(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process holds: a real listening socket that never answers HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_broken_setup_names_every_problem(tmp_path: Path, tiny_llama: Path, hf_cache: Path, held_port: int,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, {
        "here": {"source": str(tiny_llama), "aliases": ["h"]},
        "gone": {"source": str(tmp_path / "no-such-model")},
        "hub": {"source": "org/not-pulled"},
    }, port=held_port, fallback_url=f"http://127.0.0.1:{free_port()}")
    status, report = doctor(capsys, config.path)
    assert status == 1 and report["summary"]["fail"] == 3  # two models and the port
    here = row(report, "here")
    assert here["status"] == "ok" and here["data"]["aliases"] == ["h"] and here["data"]["size"] > 0
    gone = row(report, "gone")
    assert gone["status"] == "fail" and str(tmp_path / "no-such-model") in gone["found"]
    assert gone["data"]["problems"][0]["reason"] == "missing"
    hub = row(report, "hub")
    assert str(hf_cache / "models--org--not-pulled") in hub["found"] and hub["fix"] == "mlx-server pull hub"
    server = row(report, "server")
    assert server["status"] == "fail" and server["data"]["us"] is False
    assert f"port {held_port} is held by another process" in server["found"]
    if shutil.which("lsof") or shutil.which("ss"):  # the OS names the holder: this test process
        assert f"(pid {os.getpid()})" in server["found"]
    fallback = row(report, "fallback")
    assert fallback["status"] == "warn" and "does not answer" in fallback["found"]
    assert row(report, "models.yaml")["status"] == "ok" and row(report, "mlx")["status"] == "ok"
    assert row(report, "launchd")["found"].startswith("not applicable")
    containers = row(report, "containers")
    assert containers["data"]["base_url"] == f"http://host.docker.internal:{held_port}"
    assert any("curl" in line for line in containers["details"])

    assert main(["doctor", "--config", str(config.path)]) == 1  # the same rows as text, with their fixes
    text = capsys.readouterr().out
    assert "FAIL  gone" in text and "fix: mlx-server pull hub" in text and "3 problem(s) stop serving" in text


def test_a_bad_models_yaml_gives_the_check_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("server: {port: 11435}\nmodels:\n  x: {source: a/b, keep_alive: soon}\n")
    assert main(["check-config", str(bad)]) == 2
    expected = capsys.readouterr().err.strip().removeprefix("config error: ")
    status, report = doctor(capsys, bad)
    cfg = row(report, "models.yaml")
    assert status == 1 and cfg["status"] == "fail" and cfg["found"] == expected
    assert "models.x.keep_alive" in cfg["found"] and f"check-config {bad}" in cfg["fix"]
    assert not [c for c in report["checks"] if c["section"] in ("model", "fallback")]


def test_our_server_and_a_real_fallback_up_then_down(tmp_path: Path, tiny_llama: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "up").mkdir()
    upstream = make_config(tmp_path / "up", {"shared": {"source": str(tiny_llama)},
                                             "theirs": {"source": str(tiny_llama)}})
    with serve(upstream) as up:
        with serve(make_config(tmp_path, {"shared": {"source": str(tiny_llama)}})) as ours:
            front = make_config(tmp_path, {"shared": {"source": str(tiny_llama), "aliases": ["ours"]}},
                                fallback_url=up.url, port=ours.port)
            status, report = doctor(capsys, front.path, "--load")
            server = row(report, "server")
            assert server["status"] == "ok" and server["data"]["us"] is True and "mlx-server at" in server["found"]
            fallback = row(report, "fallback")
            assert fallback["status"] == "ok" and fallback["data"]["version"] == OLLAMA_VERSION
            assert fallback["data"]["would_serve_instead"] == ["shared"]
            assert set(fallback["data"]["models"]) == {"shared", "theirs"}
            loaded = row(report, "shared")["data"]["load"]
            assert loaded["seconds"] > 0 and loaded["active"] > 0 and loaded["peak"] >= loaded["active"]
            assert "loaded in" in row(report, "shared")["found"]
            assert status == 0  # warnings (a loopback bind on Linux) do not fail
    status, report = doctor(capsys, front.path)
    assert row(report, "fallback")["status"] == "warn" and row(report, "server")["status"] == "fail"


def test_doctor_never_imports_mlx_in_process(tmp_path: Path, tiny_llama: Path) -> None:
    config = make_config(tmp_path, {"here": {"source": str(tiny_llama)}}, port=free_port())
    code = ("import sys; from mlx_server.cli import main; rc = main(['doctor', '--config', sys.argv[1]]); "
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]; "
            "assert not loaded, loaded; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(config.path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr  # nothing listens on the port
    assert "ok    mlx " in result.stdout and "FAIL  server" in result.stdout


# ---- platform ------------------------------------------------------------------------------------------------


def mac(machine: str = "arm64", translated: Any = False, apple: Any = True, version: str = "26.2",
        python: tuple[int, int, int] = (3, 12, 8)) -> Platform:
    return Platform("Darwin", machine, sys.executable, python, version, translated, apple)


def test_platform_rows_for_macs() -> None:
    def rows(p: Platform) -> dict[str, dict[str, Any]]:
        return {c.name: c.as_dict() for c in platform_checks(Machine(p))}

    ok = rows(mac())
    assert [r["status"] for r in ok.values()] == ["ok", "ok", "ok"] and "JACCL" not in ok["macOS"]["found"]
    rosetta = rows(mac("x86_64", translated=True))["architecture"]
    assert rosetta["status"] == "fail" and "Rosetta" in rosetta["found"] and "arm64 Python" in rosetta["fix"]
    intel = rows(mac("x86_64", translated=None, apple=False))["architecture"]
    assert intel["status"] == "fail" and "needs Apple silicon" in intel["found"]
    assert rows(mac(version="13.6.1"))["macOS"]["status"] == "fail"
    note = rows(mac(version="15.3"))["macOS"]
    assert note["status"] == "ok" and "JACCL" in note["found"] and "26.2+" in note["found"]
    assert rows(mac(python=(3, 9, 6)))["python"]["status"] == "fail"
    # MLX that imports but finds no Metal device (this CPU build, on a "Mac") stops serving there.
    check, _ = mlx_check(Machine(mac()))
    assert check.status == "fail" and "no Metal GPU" in check.found


def test_rosetta_is_read_from_sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = tmp_path / "sysctl"
    stub.write_text('#!/bin/sh\ncase "$2" in sysctl.proc_translated) echo 1 ;; hw.optional.arm64) echo 1 ;;\n'
                    '*) echo "sysctl: unknown oid \'$2\'" >&2; exit 1 ;; esac\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert sysctl_flag("sysctl.proc_translated") is True
    assert sysctl_flag("hw.optional.arm64") is True
    assert sysctl_flag("no.such.key") is None


# ---- launchd, through the command seam ---------------------------------------------------------------------


class Launchd:
    """Answers `launchctl print` as launchd would for a job in `state`, and records every command."""

    def __init__(self, loaded: bool, state: str = "running", code: str = "(never exited)") -> None:
        self.loaded, self.state, self.code = loaded, state, code
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
        self.calls.append(list(argv))
        if argv[1] == "print" and not self.loaded:
            return subprocess.CompletedProcess(argv, 113, "", "Could not find service")
        if argv[1] in ("bootstrap", "kickstart", "bootout"):
            self.loaded = argv[1] != "bootout"
            return subprocess.CompletedProcess(argv, 0, "", "")
        pid = "\tpid = 4242\n" if self.state == "running" else ""
        return subprocess.CompletedProcess(argv, 0, f"gui/501/com.mlx-server = {{\n\tstate = {self.state}\n{pid}"
                                                    f"\tlast exit code = {self.code}\n\truns = 3\n}}\n", "")


def test_launchd_rows(tmp_path: Path) -> None:
    config = make_config(tmp_path, {}).path
    runner = Launchd(loaded=False)
    machine = Machine(mac(), run=runner, home=tmp_path / "home", uid=501)
    (check,) = launchd_checks(machine, config)
    assert check.status == "warn" and "not installed" in check.found
    assert check.fix == f"mlx-server launchd install --config {config}"
    assert runner.calls == [["launchctl", "print", "gui/501/com.mlx-server"]]

    agent = Agent("com.mlx-server", config, Host(machine.home, 501, sys.executable, {}))
    Launchctl(agent, runner, sleep=lambda s: None, err=io.StringIO()).install()  # writes the plist, as the real command does
    (check,) = launchd_checks(machine, config)
    assert check.status == "ok" and "running (pid 4242)" in check.found

    agent.log_dir.joinpath("mlx-server.err.log").write_text("starting\n" + "".join(f"line {i}\n" for i in range(9))
                                                           + "OSError: [Errno 48] Address already in use\n")
    runner.state, runner.code = "not running", "1"
    (check,) = launchd_checks(machine, config)
    assert check.status == "warn" and "last exit code 1" in check.found
    assert check.details[-1].strip() == "OSError: [Errno 48] Address already in use" and len(check.details) == 6

    other = tmp_path / "other.yaml"
    (check,) = launchd_checks(machine, other)
    assert check.status == "warn" and f"serves {config}, not {other}" in check.found


# ---- the reasons /health reports -------------------------------------------------------------------------------


def test_model_problems_name_the_place_the_size_and_the_failure(tmp_path: Path, tiny_llama: Path,
                                                                hf_cache: Path) -> None:
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    config = make_config(tmp_path, {"ok": {"source": str(tiny_llama)}, "half": {"source": str(half)},
                                    "hub": {"source": "org/absent"}, "pkg": {"source": "package:no_such_pkg/m.zip"}})
    problems = model_problems(config, {"ok": "boom", "unknown": "ignored"})
    assert set(problems) == {"ok", "half", "hub", "pkg"}
    assert problems["ok"][0].reason == "load_failed" and "boom" in problems["ok"][0].message
    assert problems["half"][0].message.startswith(f"incomplete model directory {half}: no tokenizer")
    assert problems["hub"][0].looked.startswith(str(hf_cache / "models--org--absent"))
    assert "pip install no-such-pkg" in problems["pkg"][0].fix

    (tmp_path / "small").mkdir()
    small = make_config(tmp_path / "small", {"ok": {"source": str(tiny_llama)}}, memory_budget="10KB")
    (over,) = model_problems(small)["ok"]
    assert over.reason == "over_budget" and over.budget == 10_000 and over.size > 10_000
    assert "memory budget of 10 KB" in over.message and over.as_dict()["size"] == over.size


def test_a_context_length_above_native_is_a_warning(tmp_path: Path, tiny_llama: Path) -> None:
    config = make_config(tmp_path, {"wide": {"source": str(tiny_llama), "context_length": 8192},
                                    "fits": {"source": str(tiny_llama), "context_length": 1024}})
    checks = {c.name: c for c in model_checks(config, Machine(mac()), load=False)[0]}
    assert checks["fits"].status == "ok"
    assert checks["wide"].status == "warn" and "context_length 8192 is above its native 2048" in checks["wide"].fix


def test_problem_cache_keeps_the_disk_part_and_never_extracts(tmp_path: Path, tiny_llama: Path) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in tiny_llama.iterdir():
            z.write(f, f.name)
    later = tmp_path / "later"
    config = make_config(tmp_path, {"zipped": {"source": str(archive)}, "later": {"source": str(later)}})
    assert locate_quick(config.models["zipped"], tmp_path, config.server.cache_dir).path == archive
    now = [0.0]
    cache = ProblemCache(config, ttl=5.0, clock=lambda: now[0])
    assert list(cache.get()) == ["later"]
    assert not (config.server.cache_dir / "packages").exists()  # a health probe never extracts
    shutil.copytree(tiny_llama, later)
    assert list(cache.get({"zipped": "bad"})) == ["later", "zipped"]  # failed loads always merge in
    now[0] = 5.0
    assert cache.as_json() == {}
    assert cache.as_json({"zipped": "bad"})["zipped"][0]["reason"] == "load_failed"
