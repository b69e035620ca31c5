"""scripts/pick_python (what scripts/setup_env builds .venv with), run for real against stub interpreters.

Each stub is a small shell script on a private PATH that reports a version and machine the way the real probe
asks (`python -c ...` printing "3.9 arm64"); stub `uname` and `sysctl` make this Linux box look like an Apple
silicon Mac. Nothing else is on PATH, so the machine's own pythons never answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PICK = ROOT / "scripts" / "pick_python"
BASH = shutil.which("bash") or "/bin/bash"


def stub(bin_dir: Path, name: str, output: str) -> Path:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    out = tmp_path / "bin"
    out.mkdir()
    return out


def as_mac(bin_dir: Path) -> None:
    stub(bin_dir, "uname", "Darwin")
    stub(bin_dir, "sysctl", "1")  # hw.optional.arm64: Apple silicon


def pick(bin_dir: Path, *args: str, python: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir)}
    if python is not None:
        env["PYTHON"] = python
    return subprocess.run([BASH, str(PICK), *args], capture_output=True, text=True, env=env, timeout=30)


def test_a_fresh_mac_with_only_python_3_9_is_told_what_to_install(bin_dir: Path) -> None:
    as_mac(bin_dir)
    stub(bin_dir, "python3", "3.9 arm64")
    result = pick(bin_dir)
    assert result.returncode == 1 and result.stdout == ""
    assert f"python3 ({bin_dir / 'python3'}): it is Python 3.9; mlx-server needs 3.10 or newer" in result.stderr
    assert "brew install python@3.12" in result.stderr and "python.org" in result.stderr


def test_the_newest_fitting_python_wins_and_x86_64_is_refused_on_apple_silicon(bin_dir: Path) -> None:
    as_mac(bin_dir)
    stub(bin_dir, "python3", "3.9 arm64")
    stub(bin_dir, "python3.13", "3.13 x86_64")  # an Intel Homebrew / Rosetta interpreter
    good = stub(bin_dir, "python3.11", "3.11 arm64")
    stub(bin_dir, "python3.10", "3.10 arm64")
    result = pick(bin_dir)
    assert result.returncode == 0 and result.stdout.strip() == str(good)

    (bin_dir / "python3.11").unlink()
    (bin_dir / "python3.10").unlink()
    result = pick(bin_dir)
    assert result.returncode == 1
    assert "python3.13" in result.stderr and "x86_64 build, which runs under Rosetta" in result.stderr
    assert "/opt/homebrew" in result.stderr


def test_python_is_used_when_it_fits_and_never_quietly_replaced(bin_dir: Path) -> None:
    chosen = stub(bin_dir, "mypython", "3.12 x86_64")  # x86_64 is fine off Apple silicon (this Linux box)
    stub(bin_dir, "python3.12", "3.12 x86_64")
    stub(bin_dir, "uname", "Linux")
    assert pick(bin_dir, python="mypython").stdout.strip() == str(chosen)
    old = stub(bin_dir, "old", "3.8 x86_64")
    result = pick(bin_dir, python=str(old))
    assert result.returncode == 1 and f"PYTHON={old} cannot be used" in result.stderr
    assert "apt-get install python3.12" in result.stderr


def test_an_existing_venv_python_is_checked(bin_dir: Path) -> None:
    as_mac(bin_dir)
    rosetta = stub(bin_dir, "venv-python", "3.12 x86_64")
    result = pick(bin_dir, "--check", str(rosetta))
    assert result.returncode == 1 and "rm -rf .venv" in result.stderr and "Rosetta" in result.stderr
    assert pick(bin_dir, "--check", str(stub(bin_dir, "ok-python", "3.12 arm64"))).returncode == 0


def test_setup_env_picks_its_python_with_pick_python() -> None:
    text = (ROOT / "scripts" / "setup_env").read_text()
    assert "scripts/pick_python --check .venv/bin/python" in text and 'PY="$(scripts/pick_python)"' in text
    assert os.access(PICK, os.X_OK)
