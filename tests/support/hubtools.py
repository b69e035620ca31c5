"""Helpers for tests that need a Hugging Face cache laid out by hand, or the Hub redirected to a fake."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REVISION = "a" * 40


def lay_out_cache(cache: Path, repo_id: str, model_dir: Path, revision: str = REVISION) -> Path:
    """Put model_dir into an HF cache the way hub leaves it (snapshots/<rev>/ + refs/main), without blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
