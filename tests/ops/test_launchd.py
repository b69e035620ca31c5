"""The launchd agent: the rendered plist (checked with plistlib) and the exact launchctl commands.

The command runner is the only seam: it records argv and answers like launchctl would.
"""

from __future__ import annotations

import io
import json
import os
import plistlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

from mlx_server.cli import main
from mlx_server.config.load import ConfigError
from mlx_server.ops.launchd import TEMPLATE, Agent, Group, Host, Launchctl
from support.serving import free_port, make_config, serve

UID = 501


class FakeLaunchctl:
    """Records every command; `loaded` decides what `launchctl print` answers."""

    def __init__(self, loaded: bool = False, fail: Sequence[str] = ()) -> None:
        self.loaded = loaded
        self.fail = set(fail)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
        argv = list(argv)
        self.calls.append(argv)
        verb = argv[1]
        if verb in self.fail:
            return subprocess.CompletedProcess(argv, 5, "", "Bootstrap failed: 5: Input/output error")
        if verb == "print":
            if not self.loaded:
                return subprocess.CompletedProcess(argv, 113, "", "Could not find service")
            return subprocess.CompletedProcess(argv, 0, "gui/501/com.mlx-server = {\n\tstate = running\n"
                                                        "\tprogram = /x/python\n\tpid = 4242\n"
                                                        "\tlast exit code = (never exited)\n}\n", "")
        if verb == "bootstrap":
            self.loaded = True
        if verb == "bootout":
            self.loaded = False
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    config = tmp_path / "conf" / "models.yaml"
    config.parent.mkdir()
    config.write_text("models: {}\n")
    env = {"HF_HOME": "/Volumes/models/hf", "MLX_SERVER_PORT": "11500", "MLX_SERVER_API_KEY": "k",
           "HOME": "/ignored", "SECRET_TOKEN": "no", "PATH": "/ignored/bin"}
    python = str(tmp_path / "venv" / "bin" / "python")
    return Agent(label="com.mlx-server", config=config, host=Host(tmp_path / "home", UID, python, env))


def test_rendered_plist_has_every_key(agent: Agent) -> None:
    doc = plistlib.loads(agent.render())
    home = agent.host.home
    assert doc["Label"] == "com.mlx-server"
    assert doc["ProgramArguments"] == [agent.host.python, "-m", "mlx_server", "serve", "--config", str(agent.config)]
    assert Path(doc["ProgramArguments"][0]).is_absolute() and Path(doc["ProgramArguments"][-1]).is_absolute()
    env = doc["EnvironmentVariables"]
    assert env["PATH"].split(":")[0] == str(Path(agent.host.python).parent)
    assert "/usr/bin" in env["PATH"].split(":")
    assert env["HF_HOME"] == "/Volumes/models/hf"
    assert env["MLX_SERVER_PORT"] == "11500" and env["MLX_SERVER_API_KEY"] == "k"
    assert set(env) == {"PATH", "HF_HOME", "MLX_SERVER_PORT", "MLX_SERVER_API_KEY"}
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["ThrottleInterval"] == 10
    assert doc["ProcessType"] == "Interactive"
    logs = home / "Library" / "Logs" / "mlx-server"
    assert Path(doc["StandardOutPath"]).parent == logs and Path(doc["StandardErrorPath"]).parent == logs
    assert doc["StandardOutPath"] != doc["StandardErrorPath"]
    assert doc["WorkingDirectory"] == str(agent.config.parent)
    assert "@" not in agent.render().decode()  # every placeholder filled


def test_template_is_the_source_and_a_valid_plist() -> None:
    assert TEMPLATE.is_file() and TEMPLATE.parent.name == "launchd"
    raw = plistlib.loads(TEMPLATE.read_bytes())
    assert raw["ProgramArguments"][0] == "@PYTHON@"
    readme = (TEMPLATE.parent / "README.md").read_text()
    for word in ("install", "uninstall", "status", "Logs/mlx-server", "kickstart", "bootout"):
        assert word in readme


def test_special_characters_stay_plist_strings(agent: Agent, tmp_path: Path) -> None:
    odd = tmp_path / "a & <b>" / "models.yaml"
    doc = plistlib.loads(Agent(agent.label, odd, agent.host).render())
    assert doc["ProgramArguments"][-1] == str(odd)


def test_install_writes_the_plist_then_bootstraps_and_kickstarts(agent: Agent) -> None:
    runner = FakeLaunchctl()
    assert Launchctl(agent, runner, sleep=lambda s: None, err=io.StringIO()).install() == 0
    plist = agent.host.home / "Library" / "LaunchAgents" / "com.mlx-server.plist"
    assert runner.calls == [
        ["launchctl", "print", "gui/501/com.mlx-server"],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
        ["launchctl", "kickstart", "-k", "gui/501/com.mlx-server"],
    ]
    assert plistlib.loads(plist.read_bytes()) == plistlib.loads(agent.render())
    assert plist.stat().st_mode & 0o077 == 0  # the environment may carry an API key
    assert (agent.host.home / "Library" / "Logs" / "mlx-server").is_dir()


def test_reinstall_boots_the_old_job_out_first_and_retries_bootstrap(agent: Agent) -> None:
    runner = FakeLaunchctl(loaded=True)
    sleeps: list[float] = []
    ctl = Launchctl(agent, runner, sleep=sleeps.append, err=io.StringIO())
    assert ctl.install() == 0
    assert [c[1] for c in runner.calls] == ["print", "bootout", "bootstrap", "kickstart"]
    assert runner.calls[1] == ["launchctl", "bootout", "gui/501/com.mlx-server"]

    runner = FakeLaunchctl(fail=["bootstrap"])
    err = io.StringIO()
    assert Launchctl(agent, runner, sleep=sleeps.append, err=err).install() == 1
    assert [c[1] for c in runner.calls] == ["print", "bootstrap", "bootstrap", "bootstrap"]
    assert "Input/output error" in err.getvalue() and sleeps == [1.0, 1.0]


def test_uninstall_boots_out_and_removes_the_file(agent: Agent) -> None:
    runner = FakeLaunchctl()
    ctl = Launchctl(agent, runner, sleep=lambda s: None, err=io.StringIO())
    ctl.install()
    runner.calls.clear()
    assert ctl.uninstall() == 0
    assert runner.calls == [["launchctl", "print", "gui/501/com.mlx-server"],
                            ["launchctl", "bootout", "gui/501/com.mlx-server"]]
    assert not agent.plist_path.exists()
    runner.calls.clear()
    err = io.StringIO()
    assert Launchctl(agent, runner, err=err).uninstall() == 0  # nothing installed: nothing to do
    assert runner.calls == [["launchctl", "print", "gui/501/com.mlx-server"]]
    assert "was not installed" in err.getvalue()


def test_status_shows_launchctl_and_health(agent: Agent, tmp_path: Path, tiny_llama: Path) -> None:
    runner = FakeLaunchctl(loaded=True)
    ctl = Launchctl(agent, runner, err=io.StringIO())
    out = io.StringIO()
    assert ctl.status(f"http://127.0.0.1:{free_port()}", None, out) == 1
    text = out.getvalue()
    assert "state = running" in text and "pid = 4242" in text and "not reachable" in text
    config = make_config(tmp_path, {"a": {"source": str(tiny_llama)}})
    with serve(config) as server:
        out = io.StringIO()
        assert ctl.status(server.url, None, out) == 0
    assert f"server: healthy at {server.url}" in out.getvalue()
    assert runner.calls == [["launchctl", "print", "gui/501/com.mlx-server"]] * 2


def test_cli_dry_run_prints_plist_and_commands_and_changes_nothing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = make_config(tmp_path, {})
    assert main(["launchd", "install", "--dry-run", "--config", str(config.path), "--label", "dev.mlx"]) == 0
    out = capsys.readouterr().out
    doc = plistlib.loads(out[:out.index("</plist>") + len("</plist>")].encode())
    assert doc["Label"] == "dev.mlx"
    assert doc["ProgramArguments"] == [os.path.abspath(sys.executable), "-m", "mlx_server", "serve", "--config",
                                       str(config.path)]
    uid = os.getuid()
    assert f"launchctl bootstrap gui/{uid} {tmp_path}/Library/LaunchAgents/dev.mlx.plist" in out
    assert f"launchctl kickstart -k gui/{uid}/dev.mlx" in out
    assert not (tmp_path / "Library").exists()
    assert main(["launchd", "uninstall", "--dry-run", "--config", str(config.path)]) == 0
    assert f"launchctl bootout gui/{uid}/com.mlx-server" in capsys.readouterr().out


def test_cli_install_refuses_a_broken_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models: {x: {}}\n")
    assert main(["launchd", "install", "--dry-run", "--config", str(bad)]) == 2
    assert "models.x.source" in capsys.readouterr().err


# ---- distributed: the agent runs the whole group through mlx.launch ---------------------------------------------

RING_HOSTS = [{"ssh": "m1.local", "ips": ["10.0.0.1"]}, {"ssh": "m2.local", "ips": ["10.0.0.2"]}]


def write_hostfile(path: Path, hosts: object = RING_HOSTS) -> Path:
    path.write_text(json.dumps(hosts))
    return path


def test_distributed_plist_wraps_the_serve_command_in_mlx_launch(agent: Agent, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_hostfile(tmp_path / "hosts.json")
    monkeypatch.chdir(tmp_path)
    group = Group.load(Path("hosts.json"), "ring")  # relative here: launchd would start it from elsewhere
    assert group.hostfile == tmp_path / "hosts.json" and group.hostfile.is_absolute()
    assert group.hosts == ("m1.local", "m2.local")
    dist = Agent(agent.label, agent.config, agent.host, group=group)
    doc = plistlib.loads(dist.render())
    py = agent.host.python
    assert doc["ProgramArguments"] == [
        str(Path(py).parent / "mlx.launch"), "--hostfile", str(tmp_path / "hosts.json"), "--backend", "ring", "--",
        py, "-m", "mlx_server", "serve", "--distributed", "--backend", "ring", "--config", str(agent.config)]
    assert doc["KeepAlive"] is True  # mlx.launch exits 0 when a rank dies: restart whenever the group ends
    assert doc["ThrottleInterval"] == 10
    plain = plistlib.loads(agent.render())
    assert {k: v for k, v in doc.items() if k not in ("ProgramArguments", "KeepAlive")} == \
        {k: v for k, v in plain.items() if k not in ("ProgramArguments", "KeepAlive")}
    jaccl = [{"ssh": "m1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]}, {"ssh": "m2", "rdma": ["rdma_en3", None]}]
    group = Group.load(write_hostfile(tmp_path / "jaccl.json", {"hosts": jaccl}), "jaccl")
    args = plistlib.loads(Agent(agent.label, agent.config, agent.host, group=group).render())["ProgramArguments"]
    assert args[1:6] == ["--hostfile", str(tmp_path / "jaccl.json"), "--backend", "jaccl", "--"]
    assert args[9:13] == ["serve", "--distributed", "--backend", "jaccl"]


def test_plain_agent_is_unchanged(agent: Agent) -> None:
    assert agent.group is None
    doc = plistlib.loads(agent.render())
    assert doc["ProgramArguments"] == [agent.host.python, "-m", "mlx_server", "serve", "--config", str(agent.config)]
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert agent.render() == Agent(agent.label, agent.config, agent.host, agent.template, None).render()


def test_distributed_install_writes_the_group_plist(agent: Agent, tmp_path: Path) -> None:
    group = Group.load(write_hostfile(tmp_path / "hosts.json"))
    dist = Agent(agent.label, agent.config, agent.host, group=group)
    runner = FakeLaunchctl()
    assert Launchctl(dist, runner, sleep=lambda s: None, err=io.StringIO()).install() == 0
    assert [c[1] for c in runner.calls] == ["print", "bootstrap", "kickstart"]
    doc = plistlib.loads(dist.plist_path.read_bytes())
    assert doc["ProgramArguments"][0].endswith("/mlx.launch") and doc["KeepAlive"] is True


@pytest.mark.parametrize("hosts, backend, message", [
    (None, "ring", "hostfile not found"),
    ("not json", "ring", "not a JSON hostfile"),
    ([], "ring", "non-empty list"),
    ([{"ips": ["10.0.0.1"]}], "ring", "hosts[0].ssh"),
    ([{"ssh": "m1", "ips": ["10.0.0.1"]}, {"ssh": "m2"}], "ring", "hosts[1].ips"),
    ([{"ssh": "m1", "ips": ["10.0.0.1"], "rdma": [None]}, {"ssh": "m2", "rdma": [None]}], "jaccl", "hosts[0].rdma"),
])
def test_group_refuses_a_hostfile_mlx_launch_would_reject(tmp_path: Path, hosts: object, backend: str,
                                                          message: str) -> None:
    path = tmp_path / "hosts.json"
    if isinstance(hosts, str):
        path.write_text(hosts)
    elif hosts is not None:
        write_hostfile(path, hosts)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Group.load(path, backend)


def test_cli_distributed_dry_run_prints_the_group_plist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = make_config(tmp_path, {})
    write_hostfile(tmp_path / "hosts.json")
    monkeypatch.chdir(tmp_path)
    assert main(["launchd", "install", "--dry-run", "--config", str(config.path), "--distributed",
                 "--hostfile", "hosts.json", "--backend", "ring"]) == 0
    out = capsys.readouterr().out
    doc = plistlib.loads(out[:out.index("</plist>") + len("</plist>")].encode())
    py = os.path.abspath(sys.executable)
    assert doc["ProgramArguments"] == [
        str(Path(py).parent / "mlx.launch"), "--hostfile", str(tmp_path / "hosts.json"), "--backend", "ring", "--",
        py, "-m", "mlx_server", "serve", "--distributed", "--backend", "ring", "--config", str(config.path)]
    assert doc["KeepAlive"] is True
    assert "rank 0 (m1.local) serves HTTP" in out
    assert not (tmp_path / "Library").exists()


@pytest.mark.parametrize("flags, message", [
    (["--distributed", "--hostfile", "missing.json"], "hostfile not found"),
    (["--hostfile", "hosts.json"], "--hostfile needs --distributed"),
    (["--distributed"], "--distributed needs --hostfile"),
    (["--backend", "jaccl"], "--backend needs --distributed"),
])
def test_cli_refuses_a_missing_hostfile_or_half_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], flags: list[str],
                                                          message: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = make_config(tmp_path, {})
    write_hostfile(tmp_path / "hosts.json")
    monkeypatch.chdir(tmp_path)
    assert main(["launchd", "install", "--dry-run", "--config", str(config.path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    if message == "hostfile not found":
        assert str(tmp_path / "missing.json") in err  # named by its absolute path
    assert not (tmp_path / "Library").exists()
