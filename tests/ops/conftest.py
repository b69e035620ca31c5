"""Fixtures for operations tests: a private Hugging Face cache per test and a fake Hub on loopback.

huggingface-hub reads HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT into module constants at import time, so
the tests patch those constants (the in-process server reads them at call time) and the environment (for
subprocesses) together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support.fakehub import FakeHub
from support.hubtools import point_hub_at
from support.serving import Server, free_port
from support.tinymodels import build_tiny_model


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty private HF cache, offline (HF_HUB_OFFLINE=1): nothing can leave the machine."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose weights file is >20 MB, so a download reports progress more than once (hub reads
    10 MB chunks) and can be interrupted halfway."""
    return build_tiny_model(tmp_path_factory.mktemp("hub-model"), arch="llama", seed=3, padding_bytes=21_000_000)


@pytest.fixture(scope="session")
def hub_server(hub_model: Path) -> Iterator[tuple[FakeHub, str]]:
    hub = FakeHub()
    hub.add("org/tiny", hub_model)
    server = Server(hub.app(), free_port()).start()
    try:
        yield hub, server.url
    finally:
        server.stop()


@pytest.fixture
def online(hub_server: tuple[FakeHub, str], hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """hf_cache, but online against the fake Hub (which serves org/tiny)."""
    hub, url = hub_server
    point_hub_at(monkeypatch, url)
    hub.delay = 0.0
    with hub.lock:
        hub.gets.clear()
    return hub
