"""`mlx-server doctor [--config PATH] [--json] [--load]`: why is this machine not serving what models.yaml says?

One row per check: ok / warn / fail, what was found, and the fix. Exit status 1 when any row fails (something
stops serving: a model, the server itself, the platform), else 0; warnings never change it. `--json` prints the
same rows as one object, described by docs/doctor.schema.json. Rows about the platform, memory, the config and
the models are here; those about the running server, launchd, the fallback and containers in server.py. Both
build their rows from the types in report.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, TextIO

from mlx_server.config.load import Config, ConfigError
from mlx_server.models.config import load_config
from mlx_server.models.diagnose import gb, model_problems
from mlx_server.models.info import InfoCache, context_note
from mlx_server.models.sources import Located, locate
from mlx_server.ops.doctor import server as doctor_server  # the network half
from mlx_server.ops.doctor.probes import MIN_PYTHON, mac_version_tuple, run_probe
from mlx_server.ops.doctor.report import Check, Machine, Report

MLX_MIN_MACOS = (14, 0)  # MLX's macOS wheels start at macOS 14 (Sonoma)
JACCL_MIN_MACOS = (26, 2)  # distributed MLX over Thunderbolt 5 RDMA; this server runs one machine, so a note only


# ---- platform ----------------------------------------------------------------------------------------------------


ARM64_PYTHON = (
    "install an arm64 Python (`brew install python@3.12` with Homebrew in /opt/homebrew, or the "
    "python.org macOS installer), then `rm -rf .venv && PYTHON=/opt/homebrew/bin/python3.12 "
    "scripts/setup_env`"
)


def platform_checks(m: Machine) -> list[Check]:
    p = m.platform
    version = ".".join(map(str, p.python_version))
    checks = [
        Check(
            "platform",
            "python",
            "ok" if p.python_version[:2] >= MIN_PYTHON else "fail",
            f"Python {version} at {p.python}",
            ""
            if p.python_version[:2] >= MIN_PYTHON
            else "install Python 3.10 or newer, then `rm -rf .venv && scripts/setup_env`",
            data={"version": version, "executable": p.python},
        )
    ]
    data = {"system": p.system, "machine": p.machine, "translated": p.translated, "apple_silicon": p.apple_silicon}
    if p.system != "Darwin":
        checks.append(
            Check(
                "platform",
                "architecture",
                "ok",
                f"{p.system} {p.machine}: MLX's CPU backend (mlx[cpu]; Metal needs macOS on Apple silicon)",
                data=data,
            )
        )
        return checks
    if p.machine == "arm64":
        checks.append(Check("platform", "architecture", "ok", "arm64 Python on Apple silicon", data=data))
    elif p.translated or p.apple_silicon:
        checks.append(
            Check(
                "platform",
                "architecture",
                "fail",
                f"x86_64 Python under Rosetta on Apple silicon ({p.python}): MLX's Metal wheels are arm64 only",
                ARM64_PYTHON,
                data=data,
            )
        )
    else:
        checks.append(
            Check(
                "platform",
                "architecture",
                "fail",
                f"{p.machine} Mac: MLX needs Apple silicon (M1 or later)",
                "run it on an Apple silicon Mac",
                data=data,
            )
        )
    mac = mac_version_tuple(p.mac_version)
    if mac and mac < MLX_MIN_MACOS:
        checks.append(
            Check(
                "platform",
                "macOS",
                "fail",
                f"macOS {p.mac_version}: MLX needs macOS 14 or newer",
                "update macOS",
                data={"version": p.mac_version},
            )
        )
    else:
        note = (
            ""
            if not mac or mac >= JACCL_MIN_MACOS
            else " (distributed MLX over Thunderbolt, JACCL, would need 26.2+; this server does not use it)"
        )
        checks.append(
            Check(
                "platform", "macOS", "ok", f"macOS {p.mac_version or 'unknown'}{note}", data={"version": p.mac_version}
            )
        )
    return checks


def mlx_check(m: Machine) -> tuple[Check, dict[str, Any]]:
    info = run_probe(["device"], m.probe_timeout, m.platform.python)
    if "error" in info:
        return Check(
            "platform",
            "mlx",
            "fail",
            f"MLX does not import: {info['error']}",
            "reinstall into the venv: `scripts/setup_env` (or `.venv/bin/pip install -e .`)",
            data=info,
        ), info
    dev = info.get("device_info", {})
    versions = f"mlx {info.get('mlx')}, mlx-lm {info.get('mlx_lm')}"
    if info.get("metal"):
        ws = dev.get("max_recommended_working_set_size")
        found = f"{versions}; Metal GPU {dev.get('device_name', '?')}" + (
            f", recommended working set {gb(ws)}" if isinstance(ws, (int, float)) else ""
        )
        return Check("platform", "mlx", "ok", found, data=info), info
    if m.platform.system == "Darwin":
        return Check(
            "platform",
            "mlx",
            "fail",
            f"{versions}; no Metal GPU ({info.get('default_device')}): generation would run on the CPU",
            ARM64_PYTHON,
            data=info,
        ), info
    return Check("platform", "mlx", "ok", f"{versions}; CPU backend ({dev.get('device_name', 'cpu')})", data=info), info


# ---- memory, config, models ----------------------------------------------------------------------------------


def memory_check(m: Machine, config: Optional[Config], sizes: dict[str, int], mlx: dict[str, Any]) -> Check:
    total = m.memory()
    if config is None:
        return Check(
            "memory",
            "memory",
            "ok",
            f"{gb(total)} physical RAM (no valid models.yaml: budget unknown)",
            data={"physical": total},
        )
    s = config.server
    budget = s.memory_budget
    preload = sorted((mc for mc in config.models.values() if mc.preload), key=lambda mc: mc.priority)
    preload = preload[: s.max_loaded_models]
    weights = sum(sizes.get(mc.name, 0) for mc in preload)
    need = weights + s.prompt_cache_bytes
    data = {
        "physical": total,
        "budget": budget,
        "budget_spec": s.memory_budget_spec,
        "preload_weights": weights,
        "prompt_cache_cap": s.prompt_cache_bytes,
    }
    found = (
        f"{gb(total)} RAM; budget {gb(budget)} ({s.memory_budget_spec}); preloaded weights {gb(weights)} "
        f"+ prompt caches up to {gb(s.prompt_cache_bytes)} = {gb(need)}"
    )
    ws = mlx.get("device_info", {}).get("max_recommended_working_set_size") if mlx.get("metal") else None
    if budget > total:
        return Check(
            "memory",
            "memory",
            "warn",
            found + ": the budget is more than this machine's memory",
            "lower server.memory_budget (75% of RAM is the default)",
            data=data,
        )
    if need > budget:
        return Check(
            "memory",
            "memory",
            "warn",
            found + ": more than the budget, so preloads evict each other and the caches shrink",
            "raise server.memory_budget, or preload fewer models",
            data=data,
        )
    if isinstance(ws, (int, float)) and budget > ws:
        return Check(
            "memory",
            "memory",
            "warn",
            found + f": above the GPU's recommended working set ({gb(ws)}), memory past it is not wired and may page",
            f"set server.memory_budget to at most {gb(ws)}",
            data=data,
        )
    return Check("memory", "memory", "ok", found, data=data)


def config_check(path: Path) -> tuple[Optional[Config], Check]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        # The very message `mlx-server check-config` prints (and the server refuses to start with).
        return None, Check(
            "config",
            "models.yaml",
            "fail",
            str(exc),
            f"fix the key named above; `mlx-server check-config {path}` checks it again",
            data={"path": str(path), "error": str(exc), "key": exc.key},
        )
    aliases = len(config.aliases())
    return config, Check(
        "config",
        "models.yaml",
        "ok",
        f"{config.path}: valid, {len(config.models)} model(s), {aliases} alias(es)",
        data={"path": str(config.path), "models": len(config.models)},
    )


def model_checks(config: Config, m: Machine, load: bool) -> tuple[list[Check], dict[str, int]]:
    found: dict[str, Located] = {}

    def located(model: Any, cdir: Optional[Path], cache: Optional[Path]) -> Located:
        found[model.name] = locate(model, cdir, cache)  # doctor may extract a zip (once), as the server will
        return found[model.name]

    problems = model_problems(config, locator=located)
    infos = InfoCache()
    checks: list[Check] = []
    budget = config.server.memory_budget
    for name, model in config.models.items():
        where = found[name]
        data: dict[str, Any] = {
            "source": model.source,
            "kind": where.kind,
            "present": where.present,
            "path": str(where.path) if where.path else None,
            "size": where.size,
            "aliases": list(model.aliases),
        }
        aliases = f"; aliases {', '.join(model.aliases)}" if model.aliases else ""
        mine = problems.get(name, [])
        if mine:
            data["problems"] = [p.as_dict() for p in mine]
            checks.append(
                Check(
                    "model",
                    name,
                    "fail",
                    "; ".join(p.message for p in mine) + aliases,
                    "; ".join(p.fix for p in mine),
                    data=data,
                )
            )
            continue
        share = f", {where.size / budget:.0%} of the budget" if budget else ""
        check = Check(
            "model", name, "ok", f"{gb(where.size)} ({where.kind}) at {where.path}{share}{aliases}", data=data
        )
        info = infos.describe(where)
        note = context_note(name, model.context_length, info.context_length if info is not None else 0)
        if note is not None:
            check.status, check.fix = "warn", f"{note}; lower models.{name}.context_length to stay in it"
        if load:
            _load_into(check, config, m)
        checks.append(check)
    return checks, {n: f.size for n, f in found.items()}


def _load_into(check: Check, config: Config, m: Machine) -> None:
    """Load the model alone in a child process (the server's own loading code), and add time and memory."""
    result = run_probe(["load", str(config.path), check.name], m.load_timeout, m.platform.python)
    check.data["load"] = result
    if "error" in result:
        check.status = "fail"
        check.found += f"; loading it failed: {result['error']}"
        check.fix = "check the weights (re-pull them, `mlx-server pull NAME`) and that mlx / mlx-lm support it"
        return
    check.found += (
        f"; loaded in {result['seconds']:.2f} s: weights {gb(result['weights'])}, MLX memory "
        f"{gb(result['active'])} (peak {gb(result['peak'])})"
    )
    budget = config.server.memory_budget
    if budget and result["weights"] > budget:  # a GGUF's import can be larger than the file
        check.status = "fail"
        check.found += f", more than the memory budget of {gb(budget)}"
        check.fix = f"raise server.memory_budget above {gb(result['weights'])} (plus KV for its requests)"


# ---- the whole report -------------------------------------------------------------------------------------------


def diagnose(config_path: Path, *, load: bool = False, machine: Optional[Machine] = None) -> Report:
    m = machine or Machine.current()
    report = Report(config_path)
    report.checks.extend(platform_checks(m))
    mlx, info = mlx_check(m)
    report.checks.append(mlx)
    config, cfg_check = config_check(config_path)
    report.config_path = config.path if config else config_path
    models: list[Check] = []
    sizes: dict[str, int] = {}
    if config is not None:
        models, sizes = model_checks(config, m, load)
    report.checks.append(memory_check(m, config, sizes, info))
    report.checks.append(cfg_check)
    report.checks.extend(models)
    report.checks.extend(doctor_server.checks(config, m, report.config_path or config_path))
    return report


def run(config_path: Path, *, as_json: bool, load: bool, out: TextIO, machine: Optional[Machine] = None) -> int:
    report = diagnose(config_path, load=load, machine=machine)
    if as_json:
        out.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        report.write_text(out)
    return report.exit_status


__all__ = ["diagnose", "memory_check", "mlx_check", "model_checks", "platform_checks", "run"]
