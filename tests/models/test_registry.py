"""The registry of created models: persistence, shared files, a damaged file, and how Config.models reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_server.config.tree import Config, ModelConfig
from mlx_server.models.registry import FILE_NAME, Created, Registry


def made(registry: Registry, name: str, source: str = "org/base", owned: Path | None = None,
         blobs: tuple[str, ...] = (), **layers: object) -> Created:
    return Created(model=ModelConfig(name=name, source=source, **layers), owned=owned, blobs=blobs, created_at=1.0)


def test_entries_survive_a_restart_with_every_layer(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    entry = made(registry, "pirate:latest", system="Talk like a pirate.", template="{{ messages }}",
                 options={"temperature": 0.2, "stop": ["<end>"]}, license=("MIT",),
                 messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}))
    assert registry.put(entry) is None
    again = Registry(tmp_path)
    assert list(again.models()) == ["pirate:latest"]
    model = again.models()["pirate:latest"]
    assert model == entry.model and model.name == "pirate:latest"
    assert model.messages[1] == {"role": "assistant", "content": "arr"} and model.options["stop"] == ["<end>"]
    assert not [p for p in tmp_path.iterdir() if p.name != FILE_NAME]  # no temp file left beside it


def test_owned_files_go_with_the_last_entry_that_uses_them(tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    registry = Registry(tmp_path, blob_path=lambda digest: blob_dir / f"sha256-{digest}")
    built = registry.created_dir / "m-abc"
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    (blob_dir / "sha256-aa").write_text("weights")
    registry.put(made(registry, "a:latest", str(built), owned=built, blobs=("aa",)))
    registry.put(made(registry, "b:latest", str(built), owned=built, blobs=("aa",)))  # a copy: shared
    registry.remove("a:latest")
    assert built.is_dir() and (blob_dir / "sha256-aa").exists()
    registry.remove("b:latest")
    assert not built.exists() and not (blob_dir / "sha256-aa").exists()
    assert registry.remove("b:latest") is None


def test_replacing_an_entry_frees_what_only_the_old_one_used(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    old, new = registry.created_dir / "old", registry.created_dir / "new"
    old.mkdir(parents=True)
    new.mkdir()
    registry.put(made(registry, "m:latest", str(old), owned=old))
    previous = registry.put(made(registry, "m:latest", str(new), owned=new))
    assert previous is not None and previous.owned == old
    assert not old.exists() and new.is_dir()
    registry.put(made(registry, "m:latest", str(new), owned=new))  # the same directory again: kept
    assert new.is_dir()


def test_a_damaged_entry_never_removes_files_outside_the_cache(tmp_path: Path) -> None:
    outside = tmp_path / "mine"
    outside.mkdir()
    registry = Registry(tmp_path / "cache")
    registry.put(made(registry, "x:latest", str(outside), owned=outside))
    registry.remove("x:latest")
    assert outside.is_dir()


def test_an_unreadable_registry_is_set_aside_and_the_server_starts_empty(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE_NAME).write_text('{"version": 1, "models": {"m": {"config": {"source": 3}}}}')
    registry = Registry(tmp_path)
    assert dict(registry.models()) == {}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{FILE_NAME}.unreadable-")]
    assert len(aside) == 1 and json.loads(aside[0].read_text())["models"]["m"]["config"]["source"] == 3
    assert "unreadable" in caplog.text


def test_config_models_read_the_attached_registry_live_and_the_file_wins(tmp_path: Path) -> None:
    config = Config(models={"base": {"source": "org/base", "aliases": ["b"]}})
    registry = Registry(tmp_path)
    config.attach_created(registry.models)
    assert config.resolve("new") is None
    registry.put(made(registry, "new:latest"))
    assert config.resolve("new") == "new:latest" and list(config.models) == ["base", "new:latest"]
    registry.put(made(registry, "base", source="org/other"))  # a file name is never shadowed
    assert config.models["base"].source == "org/base" and len(config.models) == 2
    assert config.in_file("base") and not config.in_file("new:latest")
    registry.remove("new:latest")
    assert "new:latest" not in config.models and config.resolve("b") == "base"
