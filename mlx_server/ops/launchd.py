"""`mlx-server launchd install|uninstall|status`: run the server as a per-user launchd agent on macOS.

The plist comes from launchd/com.mlx-server.plist.template (the single source of truth), parsed with plistlib
so the placeholders are filled as plist strings, never spliced into XML. Every launchctl call goes through one
injected runner, so tests on Linux can assert the exact commands; home dir, uid and interpreter are injected too.

`install --distributed --hostfile FILE` makes the agent start a whole group through `mlx.launch` (see `Group`):
the template's serve command is wrapped in code after loading, so the template stays the one source of it.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

from mlx_server.config.load import ConfigError
from mlx_server.ops.client import ClientError, get_json, http_client, human_size

DEFAULT_LABEL = "com.mlx-server"
TEMPLATE = Path(__file__).resolve().parents[2] / "launchd" / "com.mlx-server.plist.template"
SYSTEM_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
PASSED_ENV = ("HF_HOME", "HF_HUB_CACHE")  # plus every MLX_SERVER_*: where weights are and how to serve them
BACKENDS = ("ring", "jaccl")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class Host:
    home: Path
    uid: int
    python: str  # absolute, symlinks kept: a venv's python is a symlink whose target lies outside the venv
    environ: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def current(cls) -> "Host":
        return cls(Path.home(), os.getuid(), os.path.abspath(sys.executable), dict(os.environ))


@dataclass(frozen=True)
class Group:
    """A distributed group that `mlx.launch` starts from an mlx.launch hostfile; rank 0 (the first host) serves HTTP.

    mlx.launch runs every rank with the same interpreter and --config paths, over ssh for the other hosts, so the
    venv and models.yaml must sit at the same paths on each of them. The other ranks get only the hostfile's
    "envs", not this agent's EnvironmentVariables (put HF_HOME and the like there).
    """

    hostfile: Path  # absolute: launchd starts the agent from WorkingDirectory, not from where install ran
    backend: str = "ring"
    hosts: tuple[str, ...] = ()  # ssh names, for messages only

    @classmethod
    def load(cls, hostfile: Path, backend: str = "ring") -> "Group":
        """Checked now, because mlx.launch rejecting it would only show as an agent restarting every 10 s."""
        path = Path(os.path.abspath(hostfile.expanduser()))  # abspath, not resolve: a symlink may be repointed
        if backend not in BACKENDS:
            raise ConfigError(None, "backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
        if not path.is_file():
            raise ConfigError(path, "", "hostfile not found (mlx.launch reads it at every start of the agent)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(path, "", f"not a JSON hostfile: {exc}") from None
        hosts = data.get("hosts") if isinstance(data, dict) else data
        if not isinstance(hosts, list) or not hosts:
            raise ConfigError(path, "hosts", "expected a non-empty list of hosts")
        for i, h in enumerate(hosts):
            if not isinstance(h, dict) or not isinstance(h.get("ssh"), str) or not h["ssh"]:
                raise ConfigError(path, f"hosts[{i}].ssh", "every host needs an ssh name")
            # What mlx.launch itself checks before starting anything, per backend.
            if backend == "ring" and not h.get("ips"):
                raise ConfigError(path, f"hosts[{i}].ips", "the ring backend needs the IPs of every host")
            if backend == "jaccl" and len(h.get("rdma") or []) != len(hosts):
                raise ConfigError(path, f"hosts[{i}].rdma", f"jaccl needs one RDMA entry per host ({len(hosts)})")
        if backend == "jaccl" and not hosts[0].get("ips"):
            raise ConfigError(path, "hosts[0].ips", "jaccl needs an IP of rank 0 that the other ranks reach")
        return cls(path, backend, tuple(h["ssh"] for h in hosts))


@dataclass(frozen=True)
class Agent:
    label: str
    config: Path  # absolute path of models.yaml
    host: Host
    template: Path = TEMPLATE
    group: Optional[Group] = None  # set: the agent runs the whole distributed group through mlx.launch

    @property
    def plist_path(self) -> Path:
        return self.host.home / "Library" / "LaunchAgents" / f"{self.label}.plist"

    @property
    def launcher(self) -> Path:
        """pip installs the mlx.launch script next to the venv's python (same bin/, symlink kept)."""
        return Path(self.host.python).parent / "mlx.launch"

    @property
    def log_dir(self) -> Path:
        return self.host.home / "Library" / "Logs" / "mlx-server"

    @property
    def domain(self) -> str:
        return f"gui/{self.host.uid}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{self.label}"

    def environment(self) -> dict[str, str]:
        env = self.host.environ
        bin_dir = str(Path(self.host.python).parent)
        path = [bin_dir, *(p for p in SYSTEM_PATH if p != bin_dir)]
        out = {"PATH": ":".join(path)}
        out.update({k: v for k, v in sorted(env.items()) if k in PASSED_ENV or k.startswith("MLX_SERVER_")})
        return out

    def render(self) -> bytes:
        if not self.template.is_file():
            raise FileNotFoundError(
                f"launchd template not found at {self.template} (run from a source checkout or pass --template)"
            )
        doc = plistlib.loads(self.template.read_bytes())
        values = {
            "@LABEL@": self.label,
            "@PYTHON@": self.host.python,
            "@CONFIG@": str(self.config),
            "@WORKDIR@": str(self.config.parent),
            "@LOG_DIR@": str(self.log_dir),
            "@PATH@": self.environment()["PATH"],
        }
        doc = _fill(doc, values)
        doc.setdefault("EnvironmentVariables", {}).update(self.environment())
        if self.group is not None:
            doc["ProgramArguments"] = self._distributed_arguments(doc["ProgramArguments"], self.group)
            # mlx.launch exits 0 even when a rank died (it SIGTERMs the other ranks first), so
            # {SuccessfulExit: false} would leave a broken group down; restart whenever it ends. ThrottleInterval
            # still spaces the restarts, and bootout stops the agent for good either way.
            doc["KeepAlive"] = True
        return plistlib.dumps(doc, sort_keys=False)

    def _distributed_arguments(self, serve: list[str], group: Group) -> list[str]:
        """The template's serve command, run on every rank by mlx.launch with --distributed added after `serve`.

        mlx.launch wants the interpreter spelled out after `--`; the template's command already starts with it.
        """
        if "serve" not in serve:
            raise ConfigError(self.template, "ProgramArguments", "no `serve` to add --distributed to")
        at = serve.index("serve") + 1
        rank = [*serve[:at], "--distributed", "--backend", group.backend, *serve[at:]]
        return [str(self.launcher), "--hostfile", str(group.hostfile), "--backend", group.backend, "--", *rank]


def _fill(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace(key, value)
        return node
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


class Launchctl:
    """The only way this module touches launchd."""

    def __init__(
        self,
        agent: Agent,
        runner: Runner = run_command,
        sleep: Callable[[float], None] = time.sleep,
        err: TextIO = sys.stderr,
    ) -> None:
        self.agent = agent
        self.runner = runner
        self.sleep = sleep
        self.err = err

    def commands_for_install(self) -> list[list[str]]:
        a = self.agent
        return [["launchctl", "bootstrap", a.domain, str(a.plist_path)], ["launchctl", "kickstart", "-k", a.target]]

    def run(self, argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
        try:
            return self.runner(argv)
        except FileNotFoundError:
            raise ClientError(f"{argv[0]} not found: launchd agents are a macOS feature (try --dry-run)") from None

    def loaded(self) -> bool:
        return self.run(["launchctl", "print", self.agent.target]).returncode == 0

    def _check(self, result: "subprocess.CompletedProcess[str]") -> bool:
        if result.returncode != 0:
            detail = (result.stderr or result.stdout or "").strip()
            print(f"{' '.join(result.args)} failed ({result.returncode}): {detail}", file=self.err)
        return result.returncode == 0

    def install(self) -> int:
        a = self.agent
        plist = a.render()
        if self.loaded() and not self._check(self.run(["launchctl", "bootout", a.target])):
            return 1
        a.log_dir.mkdir(parents=True, exist_ok=True)  # launchd opens the log files but creates no folders
        a.plist_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.plist_path.with_suffix(".plist.tmp")
        tmp.write_bytes(plist)
        tmp.chmod(0o600)  # it may carry MLX_SERVER_API_KEY
        tmp.replace(a.plist_path)
        bootstrap, kickstart = self.commands_for_install()
        # Right after a bootout, launchd can still be tearing the old job down and answer EIO; give it a moment.
        for attempt in range(3):
            result = self.run(bootstrap)
            if result.returncode == 0:
                break
            if attempt < 2:
                self.sleep(1.0)
        if not self._check(result) or not self._check(self.run(kickstart)):
            return 1
        print(f"installed {a.plist_path} and started {a.target}; logs in {a.log_dir}", file=self.err)
        return 0

    def uninstall(self) -> int:
        a = self.agent
        was_loaded = self.loaded()
        if was_loaded and not self._check(self.run(["launchctl", "bootout", a.target])):
            return 1
        existed = a.plist_path.exists()
        if existed:
            a.plist_path.unlink()
        print(f"removed {a.plist_path}" if existed or was_loaded else f"{a.label} was not installed", file=self.err)
        return 0

    def status(self, url: str, key: Optional[str], out: TextIO) -> int:
        a = self.agent
        print(f"plist: {a.plist_path} ({'present' if a.plist_path.exists() else 'absent'})", file=out)
        result = self.run(["launchctl", "print", a.target])
        loaded = result.returncode == 0
        if loaded:
            keys = ("state =", "pid =", "last exit code =", "runs =", "program =")
            lines = [ln.strip() for ln in result.stdout.splitlines() if ln.strip().startswith(keys)]
            print(f"launchd: {a.target} loaded", file=out)
            for ln in lines or [ln.rstrip() for ln in result.stdout.splitlines()]:
                print(f"  {ln}", file=out)
        else:
            print(f"launchd: {a.target} not loaded", file=out)
        healthy = False
        try:
            with http_client(url, key, timeout=5.0) as client:
                health = get_json(client, "/health")
            mem = health.get("memory", {})
            healthy = health.get("status") == "healthy"
            print(
                f"server: {health.get('status')} at {url}; {health.get('models_cached', 0)} model(s) loaded, "
                f"{human_size(float(mem.get('resident_gb', 0)) * 1e9)} of "
                f"{human_size(float(mem.get('budget_gb', 0)) * 1e9)} budget; "
                f"up {health.get('uptime_seconds', 0):.0f} s",
                file=out,
            )
        except ClientError as exc:
            print(f"server: not reachable at {url} ({exc})", file=out)
        return 0 if loaded and healthy else 1

    def dry_run(self, action: str, out: TextIO) -> int:
        a = self.agent
        if action == "install":
            out.write(a.render().decode())
            if a.group is not None:
                first = f" ({a.group.hosts[0]})" if a.group.hosts else ""
                print(
                    f"# distributed ({a.group.backend}): mlx.launch starts one rank per host in "
                    f"{a.group.hostfile}; rank 0{first} serves HTTP",
                    file=out,
                )
            print(f"# would write {a.plist_path} and create {a.log_dir}, then run:", file=out)
            print(f"launchctl bootout {a.target}   # only if already loaded", file=out)
            for cmd in self.commands_for_install():
                print(" ".join(cmd), file=out)
        elif action == "uninstall":
            print(f"launchctl bootout {a.target}", file=out)
            print(f"rm {a.plist_path}", file=out)
        else:
            print(f"launchctl print {a.target}", file=out)
        return 0
