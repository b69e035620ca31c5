"""The values doctor's rows are made of, shared by checks.py (platform, memory, config, models) and server.py
(what runs), so that neither of the two imports the other's module for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TextIO

from mlx_server.ops.doctor.probes import Platform
from mlx_server.ops.launchd import Runner, run_command

Status = Literal["ok", "warn", "fail"]
SCHEMA_VERSION = 1


@dataclass
class Check:
    section: str  # platform | memory | config | model | server | launchd | fallback | containers
    name: str
    status: Status
    found: str
    fix: str = ""
    details: list[str] = field(default_factory=list)  # extra lines: log tails, a curl line
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable facts behind `found`

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "status": self.status,
            "found": self.found,
            "fix": self.fix,
            "details": list(self.details),
            "data": self.data,
        }


@dataclass
class Machine:
    """Everything doctor reads about the machine beyond the config, so tests can describe another one."""

    platform: Platform
    run: Runner = run_command  # sysctl, lsof / ss, launchctl
    home: Path = field(default_factory=Path.home)
    uid: int = field(default_factory=os.getuid)
    total_memory: Optional[int] = None  # bytes of RAM; None = ask psutil
    probe_timeout: float = 60.0
    load_timeout: float = 900.0

    @classmethod
    def current(cls) -> "Machine":
        return cls(Platform.current())

    def memory(self) -> int:
        if self.total_memory is None:
            import psutil

            self.total_memory = int(psutil.virtual_memory().total)
        return self.total_memory


@dataclass
class Report:
    config_path: Optional[Path]
    checks: list[Check] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def as_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in ("ok", "warn", "fail")}
        return {
            "schema_version": SCHEMA_VERSION,
            "config": str(self.config_path) if self.config_path else None,
            "exit_status": self.exit_status,
            "summary": counts,
            "checks": [c.as_dict() for c in self.checks],
        }

    def write_text(self, out: TextIO) -> None:
        width = max((len(c.name) for c in self.checks), default=0)
        for c in self.checks:
            label = c.status.upper() if c.status == "fail" else c.status
            print(f"{label:<5} {c.name:<{width}}  {c.found}", file=out)
            pad = " " * (6 + width + 2)
            for line in c.details:
                print(f"{pad}{line}", file=out)
            if c.fix:
                print(f"{pad}fix: {c.fix}", file=out)
        counts = self.as_dict()["summary"]
        verdict = f"{counts['fail']} problem(s) stop serving" if counts["fail"] else "nothing stops serving"
        print(f"\n{verdict}; {counts['warn']} warning(s), {counts['ok']} ok", file=out)


__all__ = ["SCHEMA_VERSION", "Check", "Machine", "Report", "Status"]
