#!/usr/bin/env python3
"""The MLX peers of scripts/bench_peers.py: one venv each, built once and cached, and how to start, poll and stop them.

Peers: `mlx_lm.server` (our pinned mlx-lm alone), `vllm-mlx`, `mlx-openai-server` and `mlx-omni-server`, each from
PyPI in its own venv under ~/.cache/mlx-server/bench-peers/<peer>-venv (--cache or $MLX_SERVER_PEERS_CACHE). A venv
is rebuilt when its recipe changes: the recipe (peer version, pins, what is dropped, the patches' source) is hashed
and the hash kept in the venv's peer-build.json, with what the build installed and cost.

How a peer is installed, all with the venv's own pip and this machine's pip configuration:

  1. the peer (and the `nodeps` packages of its recipe) are installed without their dependencies;
  2. their declared dependencies, minus `drop` and with mlx / mlx-lm replaced by *our* versions (the ones this
     python runs: `mlx[cpu]` on Linux), are resolved by pip (`--dry-run --report`): the comparison is then of servers,
     not of kernels — each peer declares `mlx-lm<0.32`, so that pin is overridden and recorded;
  3. from pip's resolution every package reachable only through a dropped one (torch: PyPI's Linux torch is the
     multi-GB CUDA build, with its nvidia-* wheels) is removed, and the rest installed at the resolved versions with
     --no-deps;
  4. the recipe's patches run (stand-ins for what a peer downloads at import time, which this machine cannot).

A peer that cannot start without torch gets the +cpu torch wheel pip sees through this machine's pip configuration
(find-links /opt/wheels), never PyPI's; one that needs a Debian package (PortAudio) gets it with apt-get when this
runs as root, or a PeerError saying what to run. Each start gets a fresh empty HOME and an empty Hugging Face cache,
offline (HF_HUB_OFFLINE=1). Run it with this project's .venv python: our pins are the mlx / mlx-lm it has.

Everything a build overrode, dropped or patched is in PeerEnv.notes / .dropped / .overridden / .patches.
A library for scripts/bench_peers.py, which is the command (`--build-only [--smoke]` builds and tries the venvs).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

RECIPE_FORMAT = 1  # bump to rebuild every venv
DEFAULT_CACHE = Path(os.environ.get("MLX_SERVER_PEERS_CACHE", Path.home() / ".cache" / "mlx-server" / "bench-peers"))
HOST = "127.0.0.1"


class PeerError(RuntimeError):
    """A peer that could not be built, started or asked: the message ends with the last lines of its log."""

    def __init__(self, peer: str, message: str, log_tail: str = "") -> None:
        self.peer = peer
        self.log_tail = log_tail
        super().__init__(f"{peer}: {message}" + (f"\n--- last lines of its log ---\n{log_tail}" if log_tail else ""))


@dataclass
class PeerEnv:
    """A built venv: its python, what went into it, and what building it cost (seconds and bytes of the build that
    made it, kept when it is reused)."""

    peer: str
    venv: str
    python: str
    version: str  # the peer's own version
    installed: dict[str, str]  # every distribution in the venv: name -> version
    dropped: list[str]  # "torch (required by outlines, mflux)": left out, and why they were wanted
    overridden: list[str]  # "mlx-lm: vllm-mlx wants <0.32.0,>=0.31.3, installed ==0.32.2"
    patches: list[str]  # what the patches did
    notes: list[str]
    install_s: float
    size_bytes: int
    recipe_hash: str
    built: bool = False  # True when this call built it, False when the cached venv was reused

    def summary(self) -> str:
        lines = [
            f"{self.peer} {self.version}: {self.install_s:.0f} s to build, {self.size_bytes / 2**20:.0f} MiB, "
            f"{len(self.installed)} distributions ({'built now' if self.built else 'cached'}, {self.venv})",
            f"  mlx {self.installed.get('mlx', '-')}, mlx-lm {self.installed.get('mlx-lm', '-')}, "
            f"transformers {self.installed.get('transformers', '-')}",
        ]
        lines += [f"  override: {o}" for o in self.overridden]
        lines += [f"  dropped: {d}" for d in self.dropped]
        lines += [f"  patch: {p}" for p in self.patches]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class Recipe:
    """How one peer installs and starts. `command` is formatted with {python}, {bin}, {model}, {port}, {host}."""

    name: str
    package: str  # the peer's requirement: "vllm-mlx==0.6.0"
    module: str  # imported after the build to check it
    command: tuple[str, ...]
    nodeps: tuple[str, ...] = ()  # further packages whose declared dependencies are overridden like the peer's
    drop: tuple[str, ...] = ()  # never installed, not even as a dependency of a dependency
    extra: tuple[str, ...] = ()  # added requirements (resolved with the rest)
    pins: tuple[str, ...] = ()  # further requirements that replace what the packages declare for those names
    patches: tuple[str, ...] = ()  # names in PATCHES, run in order after the install
    system: tuple[str, ...] = ()  # Debian packages it needs on Linux (installed with apt-get when missing, as root)
    cpu_torch: bool = False  # needs torch: the +cpu wheel the configured pip index has (never PyPI's CUDA build)
    env: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    ready_timeout_s: float = 180.0


# PyPI's torch on Linux x86_64 is the CUDA build (~4 GB with nvidia-*/triton); none of the peers needs it to serve a
# text model, so it is dropped, and with it what only torch wants. mlx-cuda-* is MLX's CUDA backend (mflux asks for
# mlx[cuda13] on Linux); gradio is vllm-mlx's chat UI (vllm-mlx-chat), not its server.
TORCH = ("torch", "torchvision", "torchaudio", "triton")
CUDA = ("mlx-cuda-12", "mlx-cuda-13")

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="mlx_lm.server",
            package="mlx-lm",  # our version: replaced by the pin below
            module="mlx_lm.server",
            command=(
                "{python}",
                "-m",
                "mlx_lm",
                "server",
                "--model",
                "{model}",
                "--host",
                "{host}",
                "--port",
                "{port}",
            ),
            notes=("mlx-lm's own server (`mlx_lm.server`), our pinned mlx and mlx-lm: nothing else",),
        ),
        Recipe(
            name="vllm-mlx",
            package="vllm-mlx==0.6.0",
            module="vllm_mlx.server",
            command=(
                "{bin}/vllm-mlx",
                "serve",
                "{model}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--continuous-batching",
            ),
            drop=(*TORCH, *CUDA, "gradio"),
            notes=(
                "--continuous-batching: its batched engine for concurrent requests (without it requests run one "
                "at a time through mlx_lm.stream_generate)",
            ),
        ),
        Recipe(
            name="mlx-openai-server",
            package="mlx-openai-server==1.8.1",
            module="app.main",
            command=(
                "{bin}/mlx-openai-server",
                "launch",
                "--model-path",
                "{model}",
                "--model-type",
                "lm",
                "--host",
                "{host}",
                "--port",
                "{port}",
            ),
            pins=("mlx-lm==0.31.3",),
            drop=(*TORCH, *CUDA, "mflux"),
            cpu_torch=True,
            notes=(
                "mlx-lm 0.31.3, its own pin (<0.32), not ours: on mlx-lm 0.32 its continuous batching turns "
                "itself off (app/core/batch_scheduler.py imports mlx_lm.generate.SequenceStateMachine, gone in "
                "0.32) and requests run one at a time",
                "torch: outlines (its JSON mode) imports outlines_core.fsm.guide, which imports torch at the top, "
                "and app/models/mlx_lm.py imports outlines: the server does not start without torch",
                "mflux (image generation) is optional at run time (imported only for --model-type "
                "image-generation / image-edit) and wants mlx[cuda13]<0.32 on Linux: dropped; so is torchvision "
                "(vision models only)",
            ),
        ),
        Recipe(
            name="mlx-omni-server",
            package="mlx-omni-server==0.5.3",
            module="mlx_omni_server.main",
            command=("{bin}/mlx-omni-server", "--host", "{host}", "--port", "{port}"),
            nodeps=("mflux",),
            drop=(*TORCH, *CUDA),
            pins=("pillow<13",),
            cpu_torch=True,
            system=("libportaudio2",),
            patches=("blank_spacy_en_core_web_sm",),
            notes=(
                "torch: outlines (its JSON mode) imports outlines_core.fsm.guide, which imports torch at the top",
                "pillow<13: its /v1/images routes import mflux, which imports PIL._typing; Pillow 13's _typing "
                "imports numbers._IntegralLike, which Python 3.11's numbers module lacks: the server does not start",
                "libportaudio2: its text-to-speech route imports f5_tts_mlx.generate, which imports sounddevice, "
                "which raises OSError('PortAudio library not found') without it: the server does not start",
                "mflux (image generation, imported by its /v1/images routes at start) is installed without its "
                "declared dependencies: it wants mlx[cuda13]<0.32 on Linux",
                "serves whatever model a request names: the request's `model` is the model directory, loaded "
                "on the first request",
            ),
        ),
    )
}


# --- the patches: stand-ins for what a peer fetches at run time -------------------------------------------------


def blank_spacy_en_core_web_sm(python: Path) -> str:
    """mlx-omni-server builds misaki's English G2P when imported (its text-to-speech), which loads spaCy's
    en_core_web_sm and, when that package is missing, downloads it (spacy.cli.download: a GitHub release, not PyPI,
    so it fails here). Installs a stand-in package of that name whose load() is a blank English pipeline."""
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pkg = Path(site) / "en_core_web_sm"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""A stand-in for spaCy\'s en_core_web_sm (scripts/peers.py): a blank English pipeline."""\n'
        "import spacy\n\n\ndef load(**overrides):\n    return spacy.blank('en')\n"
    )
    info = Path(site) / "en_core_web_sm-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: en_core_web_sm\nVersion: 0.0.0\n")
    (info / "top_level.txt").write_text("en_core_web_sm\n")
    (info / "RECORD").write_text("")
    return "en_core_web_sm: a stand-in package whose load() is spacy.blank('en') (misaki downloads the real one)"


PATCHES: dict[str, Callable[[Path], str]] = {"blank_spacy_en_core_web_sm": blank_spacy_en_core_web_sm}


# --- building -----------------------------------------------------------------------------------------------------


def our_pins() -> tuple[str, ...]:
    """The mlx and mlx-lm this python runs (ours, within pyproject.toml's ranges), as requirements: every peer gets
    these, so the comparison is of the servers, not of MLX builds."""
    mlx = metadata.version("mlx")
    extra = "[cpu]" if sys.platform == "linux" else ""
    return (f"mlx{extra}=={mlx}", f"mlx-lm=={metadata.version('mlx-lm')}")


def ensure_system(peer: str, packages: tuple[str, ...], log: Path) -> list[str]:
    """The Debian packages a peer needs (Linux only): installed with apt-get when missing and this is root, else
    PeerError with the command to run. What was done, as notes."""
    if sys.platform != "linux" or not packages:
        return []

    def missing() -> list[str]:
        query = ["dpkg-query", "-W", "-f=${Status}"]
        return [
            p
            for p in packages
            if subprocess.run([*query, p], capture_output=True, text=True).stdout != "install ok installed"
        ]

    absent = missing() if shutil.which("dpkg-query") else list(packages)
    if not absent:
        return [f"Debian package(s) {', '.join(packages)}: already installed"]
    manual = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(absent)}"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise PeerError(peer, f"needs the Debian package(s) {', '.join(absent)}; as root: {manual}")
    log.parent.mkdir(parents=True, exist_ok=True)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *absent]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("a") as out:
        for cmd in (install, ["apt-get", "update", "-q"], install):
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            if not missing():
                break
    if missing():
        raise PeerError(
            peer,
            f"needs the Debian package(s) {', '.join(absent)}, and apt-get could not install "
            f"them ({log}); as root: {manual}",
            tail(log),
        )
    return [f"Debian package(s) {', '.join(absent)}: installed now with apt-get (not there before)"]


def recipe_pins(recipe: Recipe) -> tuple[str, ...]:
    """Our pins, with the recipe's own replacing ours for the same names."""
    merged = {canonicalize_name(Requirement(p).name): p for p in (*our_pins(), *recipe.pins)}
    return tuple(merged.values())


def cpu_torch_requirement(python: Path) -> Optional[str]:
    """`torch==X+cpu` for the newest +cpu torch pip sees (this machine's pip configuration lists /opt/wheels)."""
    listing = subprocess.run(
        [str(python), "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True
    ).stdout
    cpu = [
        v.strip(" ,")
        for line in listing.splitlines()
        if "Available versions:" in line
        for v in line.split(":", 1)[1].split(",")
        if v.strip().endswith("+cpu")
    ]
    return f"torch=={cpu[0]}" if cpu else None


INSTALL_FIELDS = ("package", "module", "nodeps", "drop", "extra", "pins", "patches", "system", "cpu_torch")


def recipe_hash(recipe: Recipe, pins: tuple[str, ...]) -> str:
    """What the venv depends on: the install fields of the recipe (not its notes or start command), our pins, the
    python and the patches' source."""
    fields = {k: v for k, v in asdict(recipe).items() if k in INSTALL_FIELDS}
    blob = {
        "format": RECIPE_FORMAT,
        "recipe": fields,
        "pins": pins,
        "python": sys.version.split()[0],
        "patches": [inspect.getsource(PATCHES[p]) for p in recipe.patches],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def venv_dir(peer: str, cache: Path = DEFAULT_CACHE) -> Path:
    return cache / f"{peer}-venv"


def _run(cmd: list[str], log: Path, what: str, peer: str) -> str:
    """Run a build step, its stderr (less pip's notes on this machine's absent local index folders) and its
    non-JSON stdout to the build log; its stdout back."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    noise = ("WARNING: Location 'file://", "WARNING: Skipping page file://")
    err = "".join(line for line in proc.stderr.splitlines(keepends=True) if not line.startswith(noise))
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n{err}")
        out.write("(json)\n" if proc.stdout.lstrip().startswith(("{", "[")) else proc.stdout[-20000:])
    if proc.returncode:
        raise PeerError(peer, f"{what} failed (exit {proc.returncode}; {log})", tail(log))
    return proc.stdout


def _pip_report(python: Path, reqs: list[str], log: Path, peer: str, *, no_deps: bool = False) -> dict[str, Any]:
    cmd = [str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    out = _run(cmd + (["--no-deps"] if no_deps else []) + reqs, log, "pip resolution", peer)
    return json.loads(out)


def _deps(item: dict[str, Any], env: dict[str, str], extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """An item of pip's report: its requirements that apply here (markers evaluated, with `extras` and those the
    command line asked of it)."""
    extras = frozenset([""]) | extras | frozenset(item.get("requested_extras") or [])
    reqs = []
    for text in item["metadata"].get("requires_dist") or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras):
            reqs.append(req)
    return reqs


def build(peer: str, *, cache: Path = DEFAULT_CACHE, force: bool = False) -> PeerEnv:
    """The peer's venv, built if it is missing, broken, or its recipe changed. Raises PeerError when it cannot be
    built or its module does not import (with the last lines of the build log, kept in the venv's parent)."""
    recipe = RECIPES[peer]
    pins = recipe_pins(recipe)
    digest = recipe_hash(recipe, pins)
    venv = venv_dir(peer, cache)
    python = venv / "bin" / "python"
    record = venv / "peer-build.json"
    log = cache / f"{peer}-build.log"
    if not force and record.exists() and python.exists():
        data = json.loads(record.read_text())
        if data.get("recipe_hash") == digest:
            ensure_system(peer, recipe.system, log)  # a venv copied or kept across machines
            return PeerEnv(**{**data, "built": False})

    cache.mkdir(parents=True, exist_ok=True)
    log.write_text(f"building {peer} (recipe {digest}) {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    shutil.rmtree(venv, ignore_errors=True)
    started = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)], log, "venv", peer)
    _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], log, "pip upgrade", peer)

    extra = list(recipe.extra)
    notes = list(recipe.notes) + ensure_system(peer, recipe.system, log)
    drop = {canonicalize_name(n) for n in recipe.drop}
    if recipe.cpu_torch:
        torch = cpu_torch_requirement(python)
        if torch is None:
            raise PeerError(
                peer,
                "needs torch, and pip sees no +cpu torch wheel (PyPI's Linux torch is the multi-GB "
                "CUDA build): put one on a --find-links folder of the pip configuration",
            )
        pins = (*pins, torch)
        drop -= {"torch"}
        notes.append(f"{torch} (CPU build, from the pip configuration's find-links; not PyPI's CUDA build)")
    pin_reqs = {canonicalize_name(Requirement(p).name): Requirement(p) for p in pins}
    heads = [recipe.package, *recipe.nodeps]
    head_names = {canonicalize_name(Requirement(h).name) for h in heads}
    overridden: list[str] = []
    dropped: dict[str, set[str]] = {}

    # 1. the peer, then the nodeps packages at the versions the peer asks for, each alone: what they declare (a head
    #    that is one of our pins is resolved as one)
    todo = [Requirement(h) for h in heads if canonicalize_name(Requirement(h).name) not in pin_reqs]
    seen: set[str] = set()
    exact_heads: list[str] = []
    wanted: list[str] = []
    while todo:
        head = todo.pop(0)
        if canonicalize_name(head.name) in seen:
            continue
        seen.add(canonicalize_name(head.name))
        head_report = _pip_report(python, [str(head)], log, peer, no_deps=True)
        for item in head_report["install"]:
            who = item["metadata"]["name"]
            exact_heads.append(f"{who}=={item['metadata']['version']}")
            for req in _deps(item, head_report["environment"]):
                name = canonicalize_name(req.name)
                req = Requirement(str(req))
                req.marker = None
                if name in drop:
                    dropped.setdefault(name, set()).add(who)
                elif name in pin_reqs:
                    pin = pin_reqs[name]
                    spec = list(pin.specifier)
                    have = spec[0].version if len(spec) == 1 and spec[0].operator == "==" else None
                    if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
                        overridden.append(f"{req.name}: {who} wants {req.specifier}, installed {pin.specifier}")
                elif name in head_names:
                    todo.insert(0, req)  # at the version asked for, before the bare nodeps entry
                else:
                    wanted.append(str(req))

    # 2. those, with our pins, resolved together
    report = _pip_report(python, sorted(set(wanted)) + list(pins) + extra, log, peer)
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    env = report["environment"]

    # 3. keep what is reachable from the roots without going through a dropped package
    #    (following the extras each requirement asks of its package, as pip did)
    reached: dict[str, frozenset[str]] = {}
    queue = [
        (canonicalize_name(r.name), frozenset(canonicalize_name(e) for e in r.extras))
        for r in map(Requirement, [*wanted, *pins, *extra])
    ]
    while queue:
        name, extras = queue.pop()
        if name in drop or name not in items or (name in reached and extras <= reached[name]):
            continue
        reached[name] = reached.get(name, frozenset()) | extras
        for req in _deps(items[name], env, reached[name]):
            dep = canonicalize_name(req.name)
            if dep in drop:
                dropped.setdefault(dep, set()).add(items[name]["metadata"]["name"])
            else:
                queue.append((dep, frozenset(canonicalize_name(e) for e in req.extras)))
    keep = set(reached)
    pruned = sorted(set(items) - keep)
    exact = [f"{items[n]['metadata']['name']}=={items[n]['metadata']['version']}" for n in sorted(keep)]
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *exact_heads, *exact], log, "pip install", peer)

    # 4. patches, then the import check
    patched = [PATCHES[p](python) for p in recipe.patches]
    seconds = time.perf_counter() - started
    check = subprocess.run(
        [str(python), "-c", f"import {recipe.module}"],
        capture_output=True,
        text=True,
        env=run_env(recipe, venv),
        timeout=300,
    )
    if check.returncode:
        with log.open("a") as out:
            out.write(f"\n$ python -c 'import {recipe.module}'\n{check.stdout}{check.stderr}")
        raise PeerError(peer, f"built, but `import {recipe.module}` fails ({log})", tail(log))

    installed = json.loads(_run([str(python), "-m", "pip", "list", "--format", "json"], log, "pip list", peer))
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True).stdout.split()[0])
    if pruned:
        notes.append(f"left out with what was dropped (wanted only through it): {', '.join(pruned)}")
    notes += [f"pinned by the recipe: {p}" for p in recipe.pins]
    if recipe.nodeps:
        notes.append(f"installed without their declared dependencies, like the peer: {', '.join(recipe.nodeps)}")
    built = PeerEnv(
        peer=peer,
        venv=str(venv),
        python=str(python),
        version=next(
            i["version"]
            for i in installed
            if canonicalize_name(i["name"]) == canonicalize_name(Requirement(recipe.package).name)
        ),
        installed={i["name"].lower(): i["version"] for i in installed},
        dropped=[f"{n} (required by {', '.join(sorted(w))})" for n, w in sorted(dropped.items())],
        overridden=sorted(set(overridden)),
        patches=patched,
        notes=notes,
        install_s=round(seconds, 1),
        size_bytes=size,
        recipe_hash=digest,
        built=True,
    )
    record.write_text(json.dumps({k: v for k, v in asdict(built).items() if k != "built"}, indent=2))
    return built


# --- running --------------------------------------------------------------------------------------------------------


def run_env(recipe: Recipe, venv: Path) -> dict[str, str]:
    """The peer's environment: offline, its venv first on PATH, and a Hugging Face cache of its own that exists
    (empty): mlx_lm.server's GET /v1/models lists that cache and fails (closes the connection) when there is none."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    hub = venv.parent / "hf-hub"
    hub.mkdir(parents=True, exist_ok=True)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_CACHE=str(hub),
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
    )
    env.update(dict(recipe.env))
    return env


def command(peer: str, model_dir: Path, port: int, *, cache: Path = DEFAULT_CACHE) -> list[str]:
    venv = venv_dir(peer, cache)
    fields = {
        "python": str(venv / "bin" / "python"),
        "bin": str(venv / "bin"),
        "model": str(model_dir),
        "port": str(port),
        "host": HOST,
    }
    return [part.format(**fields) for part in RECIPES[peer].command]


def model_id(peer: str, model_dir: Path) -> str:
    """The `model` a request names: the directory itself (every peer accepts it; mlx-omni-server loads it)."""
    return str(model_dir)


def start(peer: str, model_dir: Path, port: int, log: Path, *, cache: Path = DEFAULT_CACHE) -> subprocess.Popen:
    """Start the peer (built first) on model_dir at http://127.0.0.1:port, its stdout and stderr to `log`, in a
    session of its own (stop() ends the whole group). Does not wait: see ready().

    Each start gets a fresh empty HOME (`<log>.home/`, also its working directory): vllm-mlx saves its prefix cache
    under ~/.cache/vllm-mlx at shutdown and loads it at start, which would carry one run's cache into the next."""
    build(peer, cache=cache)
    venv = venv_dir(peer, cache)
    log.parent.mkdir(parents=True, exist_ok=True)
    home = log.with_name(log.name + ".home")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    env = {**run_env(RECIPES[peer], venv), "HOME": str(home)}
    with log.open("w") as out:
        out.write(f"$ {' '.join(command(peer, model_dir, port, cache=cache))}\n")
        out.flush()
        proc = subprocess.Popen(
            command(peer, model_dir, port, cache=cache),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=home,
            start_new_session=True,
        )
    proc.peer = peer  # type: ignore[attr-defined]
    proc.log = log  # type: ignore[attr-defined]
    return proc


def url_of(port: int) -> str:
    return f"http://{HOST}:{port}"


def ready(
    url: str,
    proc: Optional[subprocess.Popen] = None,
    *,
    timeout: float = 180.0,
    peer: str = "peer",
    log: Optional[Path] = None,
) -> dict[str, Any]:
    """Poll GET {url}/v1/models until it answers 200 (its JSON is returned). With `proc`, a process that exits
    meanwhile raises PeerError at once; a timeout raises it too, with the log's last lines."""
    peer = getattr(proc, "peer", peer)
    log = log or getattr(proc, "log", None)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerError(peer, f"exited with {proc.returncode} before serving {url}", tail(log))
        try:
            resp = httpx.get(f"{url}/v1/models", timeout=5.0)
            if resp.status_code == 200:
                return resp.json()
            last = f"GET /v1/models: {resp.status_code} {resp.text[:200]}"
        except ValueError as exc:
            last = f"GET /v1/models: 200 but not JSON ({exc})"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise PeerError(peer, f"not serving {url} after {timeout:.0f} s ({last})", tail(log))


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> Optional[int]:
    """SIGINT the peer's process group (a clean uvicorn shutdown), then SIGTERM, then SIGKILL. Its exit code."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # what is left of its group (workers that outlived it)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.poll()


def tail(log: Optional[Path], lines: int = 30) -> str:
    if log is None or not Path(log).exists():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def chat_stream(
    url: str, model: str, prompt: str = "Say hello.", max_tokens: int = 16, timeout: float = 300.0
) -> dict[str, Any]:
    """One greedy streaming /v1/chat/completions: the text, the number of content chunks, TTFT and total seconds.
    Raises httpx errors or ValueError on a malformed stream."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    text, chunks, done = [], 0, False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as resp:
        if resp.status_code != 200:
            resp.read()
            raise ValueError(f"POST /v1/chat/completions: {resp.status_code} {resp.text[:500]}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - started
                    text.append(piece)
                    chunks += 1
    if not chunks:
        raise ValueError("the stream carried no content")
    return {
        "text": "".join(text),
        "chunks": chunks,
        "ttft_s": first,
        "total_s": time.perf_counter() - started,
        "done": done,
    }


def smoke(peer: str, model_dir: Path, port: int, log: Path, *, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Start the peer on model_dir, wait for it, stream one chat, stop it. PeerError (with its log) on any failure."""
    proc = start(peer, model_dir, port, log, cache=cache)
    try:
        started = time.perf_counter()
        models = ready(url_of(port), proc, timeout=RECIPES[peer].ready_timeout_s)
        ready_s = time.perf_counter() - started
        try:
            result = chat_stream(url_of(port), model_id(peer, model_dir))
        except (httpx.HTTPError, ValueError) as exc:
            raise PeerError(peer, f"streaming chat failed: {type(exc).__name__}: {exc}", tail(log)) from exc
        return {**result, "ready_s": ready_s, "models": [m.get("id") for m in models.get("data", [])]}
    finally:
        stop(proc)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tiny_model(out: Path) -> Path:
    """The tiny random llama of the smoke test (hidden 256, 4 layers), built once."""
    if not (out / "model.safetensors").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support.tinymodels import build_tiny_model

        build_tiny_model(out, hidden_size=256, num_layers=4)
    return out


def build_and_smoke(
    names: list[str], *, cache: Path = DEFAULT_CACHE, force: bool = False, smoke_test: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Build (or reuse) each peer's venv and print what it needed; with smoke_test, also start it on the tiny model
    and stream one chat. Per peer {"build": PeerEnv as a dict, "command": [...], "smoke": {...}} or {"error": str}:
    a peer that fails is reported (its error and log lines printed and kept), never skipped. The failed ones too."""
    results: dict[str, Any] = {}
    failed: list[str] = []
    for name in names:
        try:
            env = build(name, cache=cache, force=force)
            print(env.summary(), flush=True)
            results[name] = {"build": asdict(env), "command": command(name, Path("MODEL_DIR"), 8000, cache=cache)}
            if smoke_test:
                model = tiny_model(cache / "smoke" / "tiny-llama-256x4")
                res = smoke(name, model, free_port(), cache / "smoke" / f"{name}.log", cache=cache)
                print(
                    f"  served the tiny model: ready in {res['ready_s']:.1f} s, {res['chunks']} chunks, "
                    f"TTFT {res['ttft_s'] * 1000:.0f} ms, text {res['text']!r}",
                    flush=True,
                )
                results[name]["smoke"] = res
        except PeerError as exc:
            failed.append(name)
            print(f"FAILED {exc}", flush=True)
            results.setdefault(name, {})["error"] = str(exc)
    return results, failed
