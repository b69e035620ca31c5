"""Shared fixtures: tiny real checkpoints built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.tinymodels import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama architecture (untied head) with the ChatML/Qwen-style template,
    so tool calls are parsed by mlx_lm's json_tools parser."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 architecture (q/k/v biases, tied head) with the ChatML template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama architecture with the Llama-3 header template: a second template
    family, a BOS token, two EOS ids and no tool parser."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama3"), arch="llama", template="llama3", seed=2
    )


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mlx-server cache dir per test session, so the demo GGUF is imported once for every test using it."""
    return tmp_path_factory.mktemp("demo-cache")
