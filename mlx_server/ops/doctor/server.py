"""Doctor's rows about what runs: the configured port (us, another process, or nothing), the launchd agent, the
fallback Ollama, and how containers reach us. The platform, config and model rows are in checks.py, which imports
this module; both build their rows from report.py's types.
"""

from __future__ import annotations

import io
import plistlib
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from mlx_server.config.load import DEFAULT_PORT, Config
from mlx_server.models.diagnose import gb
from mlx_server.ops.client import ClientError
from mlx_server.ops.doctor.probes import connect_host, get, is_listening, is_us, port_owner
from mlx_server.ops.doctor.report import Check, Machine
from mlx_server.ops.launchd import DEFAULT_LABEL, Agent, Host, Launchctl

LOG_TAIL = 5
OLLAMA_PORT = 11434


def _url(host: str, port: int) -> str:
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _start_fix(m: Machine, config_path: Path) -> str:
    if m.platform.system == "Darwin":
        return (
            f"start it: `scripts/serve`, or have launchd start it at login: "
            f"`mlx-server launchd install --config {config_path}`"
        )
    return f"start it: `scripts/serve` or `mlx-server --config {config_path} serve`"


def server_check(config: Optional[Config], m: Machine, config_path: Path) -> Check:
    host, port = (config.server.host, config.server.port) if config else ("127.0.0.1", DEFAULT_PORT)
    url = _url(host, port)
    data: dict[str, Any] = {"url": url, "port": port, "listening": False}
    if not is_listening(host, port):
        return Check(
            "server",
            "server",
            "fail",
            f"nothing is listening on {connect_host(host)}:{port}: the server "
            "is not running (clients get connection refused; those set up to fall back use Ollama)",
            _start_fix(m, config_path),
            data=data,
        )
    data["listening"] = True
    health = get(f"{url}/health", timeout=2.0)
    if is_us(health):
        body = health.body
        mem = body.get("memory", {})
        data.update(us=True, health=body)
        found = (
            f"mlx-server at {url}: {body.get('status')}, {body.get('models_cached', 0)} of "
            f"{body.get('total_models', '?')} model(s) loaded, {gb(float(mem.get('resident_gb', 0)) * 1e9)} of "
            f"{gb(float(mem.get('budget_gb', 0)) * 1e9)} budget, up {float(body.get('uptime_seconds', 0)):.0f} s"
        )
        warnings = [str(w) for w in body.get("warnings", [])]
        if body.get("status") == "healthy":
            return Check("server", "server", "warn" if warnings else "ok", found, details=warnings, data=data)
        return Check(
            "server",
            "server",
            "fail",
            found,
            "read its log (launchd: ~/Library/Logs/mlx-server/mlx-server.err.log), then restart it",
            details=warnings,
            data=data,
        )
    owner = port_owner(port, m.run)
    data.update(us=False, owner=owner)
    who = owner or (
        "a process the OS does not name (lsof / ss show none: another user's? try "
        f"`sudo lsof -nP -iTCP:{port} -sTCP:LISTEN`)"
    )
    if health.status is not None:  # it speaks HTTP: is it an Ollama?
        version = get(f"{url}/api/version", timeout=2.0)
        if isinstance(version.body, dict) and version.body.get("version"):
            data["version"] = version.body["version"]
            who += f", answering like Ollama {version.body['version']}"
    return Check(
        "server",
        "server",
        "fail",
        f"port {port} is held by another process: {who}",
        "stop that process, or serve on another port (server.port in models.yaml or MLX_SERVER_PORT) and "
        "point clients there",
        data=data,
    )


def launchd_checks(m: Machine, config_path: Path) -> list[Check]:
    if m.platform.system != "Darwin":
        return [Check("launchd", "launchd", "ok", f"not applicable on {m.platform.system} (launchd is macOS's)")]
    agent = Agent(DEFAULT_LABEL, config_path, Host(m.home, m.uid, m.platform.python, {}))
    install = f"mlx-server launchd install --config {config_path}"
    data: dict[str, Any] = {
        "label": agent.label,
        "plist": str(agent.plist_path),
        "installed": agent.plist_path.exists(),
    }
    try:
        result = Launchctl(agent, m.run, err=io.StringIO()).run(["launchctl", "print", agent.target])
    except ClientError as exc:
        return [Check("launchd", "launchd", "warn", str(exc), data=data)]
    data["loaded"] = loaded = result.returncode == 0
    fields = _launchctl_fields(result.stdout) if loaded else {}
    data.update(fields)
    tail = _log_tail(agent.log_dir / "mlx-server.err.log")
    details = [f"{agent.log_dir / 'mlx-server.err.log'}:", *(f"  {ln}" for ln in tail)] if tail else []
    served = _plist_config(agent.plist_path)
    if served and Path(served) != config_path:
        return [
            Check(
                "launchd",
                "launchd",
                "warn",
                f"{agent.target} serves {served}, not {config_path}",
                install,
                details,
                data,
            )
        ]
    if not data["installed"] and not loaded:
        return [
            Check(
                "launchd",
                "launchd",
                "warn",
                f"agent not installed ({agent.plist_path}): nothing starts the server at login or restarts it",
                install,
                data=data,
            )
        ]
    if not loaded:
        return [
            Check(
                "launchd",
                "launchd",
                "warn",
                f"{agent.plist_path} present but not loaded",
                f"launchctl bootstrap {agent.domain} {agent.plist_path}   (or {install})",
                details,
                data,
            )
        ]
    state, code = fields.get("state", "?"), fields.get("last exit code", "(never exited)")
    found = (
        f"{agent.target} loaded, {state}"
        + (f" (pid {fields['pid']})" if fields.get("pid") else "")
        + f", last exit code {code}"
    )
    if state != "running" or code not in ("0", "(never exited)"):
        return [
            Check(
                "launchd",
                "launchd",
                "warn",
                found,
                f"read the log lines below; `launchctl kickstart -k {agent.target}` restarts it",
                details,
                data,
            )
        ]
    return [Check("launchd", "launchd", "ok", found, details=details, data=data)]


def _launchctl_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key in ("state", "pid", "last exit code", "runs") and key not in out:
            out[key] = value.strip()
    return out


def _log_tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def _plist_config(plist: Path) -> Optional[str]:
    try:
        args = plistlib.loads(plist.read_bytes()).get("ProgramArguments", [])
    except (OSError, ValueError, plistlib.InvalidFileException):
        return None
    return str(args[args.index("--config") + 1]) if "--config" in args[:-1] else None


def fallback_check(config: Config) -> Check:
    s = config.server
    url = (s.fallback_url or "").rstrip("/")
    if not url:
        return Check(
            "fallback",
            "fallback",
            "ok",
            "server.fallback_url not set: names not configured here get 404 (nothing is proxied to Ollama)",
            data={"url": None},
        )
    data: dict[str, Any] = {"url": url, "when_busy": s.fallback_when_busy}
    parts = urlsplit(url)
    if parts.port == s.port and connect_host(parts.hostname or "") in (connect_host(s.host), "localhost"):
        return Check(
            "fallback",
            "fallback",
            "fail",
            f"fallback_url {url} is this server itself",
            f"point server.fallback_url at Ollama (usually http://127.0.0.1:{OLLAMA_PORT})",
            data=data,
        )
    version, tags = get(f"{url}/api/version", timeout=3.0), get(f"{url}/api/tags", timeout=3.0)
    if version.status != 200 or not isinstance(tags.body, dict):
        why = version.error or f"HTTP {version.status}"
        return Check(
            "fallback",
            "fallback",
            "warn",
            f"fallback {url} does not answer ({why}): requests for names "
            "not configured here fail" + (" and so do refusals" if s.fallback_when_busy else ""),
            "start Ollama there (`ollama serve`), or fix or remove server.fallback_url",
            data=data,
        )
    theirs = {str(m.get("name") or m.get("model")) for m in tags.body.get("models", []) if isinstance(m, dict)}
    canon = {n.removesuffix(":latest") for n in theirs}
    ours = [*config.models, *config.aliases()]
    instead = [n for n in ours if n.removesuffix(":latest") in canon]
    lacks = [n for n in config.models if n.removesuffix(":latest") not in canon]
    data.update(
        version=version.body.get("version") if isinstance(version.body, dict) else None,
        models=sorted(theirs),
        would_serve_instead=instead,
        lacks=lacks,
    )
    found = f"Ollama {data['version']} at {url} with {len(theirs)} model(s); it answers names not configured here"
    found += "; with fallback_when_busy, our refusals too" if s.fallback_when_busy else ""
    found += (
        f"; configured names it would serve instead (if clients reach it rather than us): {', '.join(instead)}"
        if instead
        else "; it has none of the configured names"
    )
    return Check("fallback", "fallback", "ok", found, data=data)


def containers_check(config: Optional[Config], m: Machine) -> Check:
    host, port = (config.server.host, config.server.port) if config else ("127.0.0.1", DEFAULT_PORT)
    base = f"http://host.docker.internal:{port}"
    auth = ' -H "Authorization: Bearer $MLX_SERVER_API_KEY"' if config and config.server.api_key else ""
    details = [
        f"try from a container: docker run --rm curlimages/curl -si{auth} {base}/api/version  "
        "(X-Served-By: mlx-server)",
        f"inside one that has curl: curl -s{auth} {base}/api/tags",
    ]
    data = {"base_url": base, "host": host, "port": port}
    found = (
        f"containers reach this server at {base}: set it where they had Ollama's "
        f"http://host.docker.internal:{OLLAMA_PORT} (OLLAMA_HOST, OLLAMA_BASE_URL, base_url); the Host check "
        "accepts *.internal"
    )
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if m.platform.system == "Linux" and loopback:
        return Check(
            "containers",
            "containers",
            "warn",
            found + f"; but it binds {host}, which Linux containers "
            "cannot reach (Docker Desktop on macOS forwards to loopback, Linux Docker does not)",
            "set server.host: 0.0.0.0 (with server.api_key) and run containers with "
            "--add-host=host.docker.internal:host-gateway",
            details,
            data,
        )
    return Check("containers", "containers", "ok", found, details=details, data=data)


def checks(config: Optional[Config], m: Machine, config_path: Path) -> list[Check]:
    out = [server_check(config, m, config_path), *launchd_checks(m, config_path)]
    if config is not None:
        out.append(fallback_check(config))
    out.append(containers_check(config, m))
    return out
