"""Download a configured model's weights with huggingface-hub, verify them, and delete them again.

Only what an MLX checkpoint needs is fetched (top-level weights, config and tokenizer files), file by file so
a caller can report progress per file the way `ollama pull` reports layers. huggingface-hub does the caching,
locking and retrying; an interrupted pull keeps every finished file, so the next one fetches only the rest
(huggingface-hub >= 2 restarts a partially downloaded file). `HF_HUB_OFFLINE` and an unreachable Hub fall back
to the local cache.
Non-HF sources (local dirs, .gguf files, package files) are never downloaded, only verified. No MLX and no
printing: `mlx-server pull` / `preload` (ops/) and /api/pull and /api/delete (api/manage.py) both call this.
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mlx_server.config.load import ModelConfig
from mlx_server.models.sources import Located, SourceKind, complete_model_dir, locate, missing_parts

# What mlx_lm.load reads from a checkpoint folder. Sub-folders never count (repos ship PyTorch or GGUF copies
# there), and *.bin / *.pth are never needed.
MLX_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.jinja",
    "chat_template.json",
    "*.model",
    "*.tiktoken",
)


class PullError(Exception):
    """Why a model could not be made present; the message is meant for the operator as is."""


class PullCancelled(PullError):
    pass


@dataclass(frozen=True)
class FileProgress:
    filename: str
    digest: str  # "sha256:<hex>", the LFS digest when the Hub gives one
    total: int
    completed: int


ProgressFn = Callable[[FileProgress], None]


@dataclass(frozen=True)
class PullResult:
    name: str
    kind: SourceKind
    path: Optional[Path]
    size: int
    downloaded: bool  # whether anything was fetched this time
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def wanted_files(names: list[str]) -> list[str]:
    """The repo files an MLX model needs, in download order (small files first so failures show early)."""
    top = [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in MLX_PATTERNS)]
    weights = [n for n in top if n.endswith(".safetensors")]
    # Some repos carry a consolidated copy of the weights next to the sharded model-*.safetensors set.
    if any(n.startswith("model") for n in weights):
        top = [n for n in top if not n.endswith(".safetensors") or n.startswith("model")]
    return sorted(top, key=lambda n: (n.endswith(".safetensors"), n))


def _progress_bar(report: ProgressFn, filename: str, digest: str, size: int, cancel: Optional[threading.Event]) -> type:
    """A tqdm stand-in for one file: huggingface-hub drives it, we forward (total, completed) to `report`."""

    class FileBar:
        def __init__(self, *args: Any, total: Optional[int] = None, initial: int = 0, **kwargs: Any) -> None:
            self.total = total or size
            self.n = initial
            self.stopping = False
            report(FileProgress(filename, digest, self.total, self.n))

        def update(self, n: Optional[float] = 1) -> None:
            # Raising inside the hub's read loop is the only way to stop a running download. The hub calls
            # update() before writing the chunk it counts, so raise one call later and let that chunk land
            # (hub versions that keep partial files resume from it).
            if self.stopping:
                raise PullCancelled("pull cancelled")
            self.stopping = cancel is not None and cancel.is_set()
            self.n += int(n or 0)
            report(FileProgress(filename, digest, self.total, self.n))

        def update_transfer(self, n: Optional[float] = 1) -> None:
            # Network bytes (before Xet reconstruction); the file bytes in update() are what we report.
            pass

        @property
        def format_dict(self) -> dict[str, Any]:
            return {}

        def __enter__(self) -> "FileBar":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def close(self) -> None:
            pass

        def __getattr__(self, name: str) -> Callable[..., None]:
            # refresh, set_postfix_str, set_description…: display calls we have nothing to do for.
            return lambda *args, **kwargs: None

    return FileBar


def _silent_bar() -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _explain(repo_id: str, exc: BaseException, cause: Optional[BaseException] = None) -> PullError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, PullError):
        return exc
    if isinstance(exc, GatedRepoError):
        return PullError(f"{repo_id} is gated: accept its terms on the Hugging Face website and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return PullError(f"repository {repo_id} not found on the Hugging Face Hub (private repos need HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return PullError(f"{repo_id}: revision not found on the Hugging Face Hub")
    cache = constants.HF_HUB_CACHE
    if constants.is_offline_mode():
        return PullError(
            f"{repo_id} is not (completely) in the Hugging Face cache at {cache} and HF_HUB_OFFLINE "
            f"is set; unset HF_HUB_OFFLINE to download it"
        )
    if cause is not None:
        return PullError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(cause).__name__}: "
            f"{cause}) and {repo_id} is not (completely) in the cache at {cache}"
        )
    return PullError(f"downloading {repo_id} failed: {type(exc).__name__}: {exc}")


def _from_cache(repo_id: str, cause: Optional[BaseException]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # Only config.json is demanded here: the hub's own completeness check would also want files we never
        # fetch (a consolidated copy of the weights); complete_model_dir() judges the folder afterwards.
        return Path(snapshot_download(repo_id, allow_patterns=["config.json"], local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one operator-readable message
        raise _explain(repo_id, exc, cause) from exc


def fetch_hf(
    repo_id: str, *, progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None
) -> tuple[Path, bool]:
    """The snapshot folder of repo_id with every MLX file present, and whether anything was downloaded.

    progress=None shows huggingface-hub's own progress bars (CLI); otherwise each file reports through it.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.is_offline_mode():
        return _from_cache(repo_id, None), False
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise _explain(repo_id, exc) from exc
    except Exception as exc:  # noqa: BLE001 - connection errors are the hub's HTTP library's types, not ours
        return _from_cache(repo_id, exc), False
    commit = info.sha
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    files = wanted_files(list(siblings))
    if not files:
        raise PullError(f"{repo_id} has no files an MLX model needs (config.json, tokenizer, *.safetensors)")
    downloaded = False
    try:
        for name in files:
            sib = siblings[name]
            sha = sib.lfs.sha256 if sib.lfs else hashlib.sha256(f"{repo_id}@{commit}/{name}".encode()).hexdigest()
            size = int(sib.size or 0)
            cached = try_to_load_from_cache(repo_id, name, revision=commit)
            if isinstance(cached, str):
                if progress is not None:
                    progress(FileProgress(name, f"sha256:{sha}", size, size))
                continue
            downloaded = True
            bar = _progress_bar(progress, name, f"sha256:{sha}", size, cancel) if progress is not None else None
            hf_hub_download(repo_id, name, revision=commit, tqdm_class=bar)
        # A branch-name call writes refs/main (what try_to_load_from_cache and sources.locate read) and the tree
        # listing; every file is cached by now, so it downloads nothing unless the branch moved meanwhile.
        path = snapshot_download(
            repo_id, allow_patterns=files, tqdm_class=_silent_bar() if progress is not None else None
        )
    except Exception as exc:  # noqa: BLE001 - see _explain
        raise _explain(repo_id, exc) from exc
    return Path(path), downloaded


def ensure_local(
    model: ModelConfig,
    config_dir: Optional[Path],
    *,
    update: bool = True,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[threading.Event] = None,
    cache_dir: Optional[Path] = None,
) -> PullResult:
    """Make `model` present on disk and verified.

    update=False (preload) skips the Hub entirely when a complete copy is cached; update=True (pull) asks the
    Hub for the current revision, which is cheap when nothing changed.
    """
    found = locate(model, config_dir, cache_dir)
    if found.kind != "hf":
        return _verify_local(model.name, found)
    if found.present and not update:
        return PullResult(model.name, "hf", found.path, found.size, downloaded=False)
    repo_id = model.source.strip()
    try:
        path, downloaded = fetch_hf(repo_id, progress=progress, cancel=cancel)
    except PullError as exc:
        return PullResult(model.name, "hf", None, 0, downloaded=False, error=str(exc))
    if not complete_model_dir(path):
        return PullResult(
            model.name,
            "hf",
            None,
            0,
            downloaded=downloaded,
            error=f"{repo_id} at {path} is incomplete: {missing_parts(path)}",
        )
    found = locate(model, config_dir, cache_dir)
    if not found.present:  # e.g. the download landed under a revision other than refs/main
        return PullResult(
            model.name,
            "hf",
            None,
            0,
            downloaded=downloaded,
            error=f"{repo_id} was downloaded to {path} but is not found by its name; {found.hint}",
        )
    return PullResult(model.name, "hf", found.path, found.size, downloaded=downloaded)


def _verify_local(name: str, found: Located) -> PullResult:
    if found.present:
        return PullResult(name, found.kind, found.path, found.size, downloaded=False)
    return PullResult(name, found.kind, None, 0, downloaded=False, error=found.hint)


class NotManaged(PullError):
    """The weights belong to the user (a local dir or file), not to a cache mlx-server downloads into."""


def check_managed(model: ModelConfig, config_dir: Optional[Path]) -> None:
    """Raise NotManaged unless the model's weights live in the Hugging Face cache (the only place we delete)."""
    kind = locate(model, config_dir).kind
    if kind != "hf":
        what = "file" if kind in ("gguf", "package", "zip", "ollama") else "directory"
        raise NotManaged(
            f'model "{model.name}" is not managed by mlx-server (its source {model.source!r} is a '
            f"local {what}); delete its files yourself"
        )


def delete_local(model: ModelConfig, config_dir: Optional[Path]) -> bool:
    """Remove an HF-sourced model's cached repo (every revision). False when nothing was cached."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    check_managed(model, config_dir)
    repo_id = model.source.strip()
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return False
    revisions = [
        rev.commit_hash
        for repo in cache.repos
        if repo.repo_type == "model" and repo.repo_id == repo_id
        for rev in repo.revisions
    ]
    if not revisions:
        return False
    cache.delete_revisions(*revisions).execute()
    return True


__all__ = [
    "MLX_PATTERNS",
    "FileProgress",
    "NotManaged",
    "ProgressFn",
    "PullCancelled",
    "PullError",
    "PullResult",
    "check_managed",
    "delete_local",
    "ensure_local",
    "fetch_hf",
    "wanted_files",
]
