"""models.info: which models see images — a vision_config in config.json, or models.yaml `kind` — never a GGUF."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from mlx_server.models.info import InfoCache, ModelInfo, with_vision
from mlx_server.models.sources import Located
from support.fakeengine import fake_model


def describe(path: Path) -> ModelInfo:
    info = InfoCache().describe(Located("dir", path, 64))
    assert info is not None
    return info


def test_a_vision_config_means_vision(tmp_path: Path) -> None:
    seer = describe(fake_model(tmp_path / "seer", "{{ tools }}", vision_config={"hidden_size": 8}))
    assert seer.vision and seer.capabilities == ["completion", "tools", "vision"]
    plain = describe(fake_model(tmp_path / "plain", "{{ messages }}"))
    assert not plain.vision and plain.capabilities == ["completion"]
    assert not describe(fake_model(tmp_path / "odd", "", vision_config=None)).vision  # a null is not a config


def test_models_yaml_kind_overrides_the_files(tmp_path: Path) -> None:
    seer = describe(fake_model(tmp_path / "seer", "", vision_config={"hidden_size": 8}))
    plain = describe(fake_model(tmp_path / "plain", ""))
    assert with_vision(plain, "vision").vision  # type: ignore[union-attr]
    assert not with_vision(seer, "generation").vision  # type: ignore[union-attr]
    assert with_vision(seer, None) is seer and with_vision(None, "vision") is None
    # an embedding model lists only "embedding", whatever else it is
    assert dataclasses.replace(seer, embedding=object()).capabilities == ["embedding"]  # type: ignore[arg-type]


def test_a_gguf_never_sees_images() -> None:
    gguf = ModelInfo(format="gguf", family="gemma3", parameter_count=1, quantization="Q4_K", context_length=8,
                     template="", modified=dt.datetime.now(dt.timezone.utc))
    assert with_vision(gguf, "vision") is gguf and "vision" not in gguf.capabilities
