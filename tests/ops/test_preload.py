"""`mlx-server preload` / `pull` and scripts/preload_models: a local HF cache, a fake Hub, a real server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.hubtools import lay_out_cache
from support.fakehub import FakeHub
from mlx_server.cli import main
from mlx_server.ops.preload import select
from support.serving import free_port, make_config, serve

REPO = Path(__file__).resolve().parents[2]


def rows(text: str) -> dict[str, str]:
    """Table lines by their first column."""
    return {line.split()[0]: line for line in text.splitlines()[1:] if line.strip()}


def test_preload_downloads_nothing_offline_warms_in_priority_order_and_fails_on_missing(
        tmp_path: Path, hf_cache: Path, tiny_llama: Path, tiny_qwen2: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    lay_out_cache(hf_cache, "org/tiny", tiny_llama)
    config = make_config(tmp_path, {
        "tiny": {"source": "org/tiny", "priority": 5, "keep_alive": "10m"},
        "local": {"source": str(tiny_qwen2), "priority": 1, "keep_alive": -1},
        "missing": {"source": "org/missing"},
        "gone": {"source": "nowhere.gguf"},
    })
    with serve(config) as server:
        rc = main(["--config", str(config.path), "preload", "--server", server.url])
        out = capsys.readouterr().out
        with server.client() as c:
            ps = {m["name"]: m for m in c.get("/api/ps").json()["models"]}
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "ON", "DISK", "LOAD", "S", "RESIDENT", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["local", "tiny", "gone", "missing"]  # yaml.safe_dump sorts keys
    table = rows(out)
    assert table["local"].rstrip().endswith("loaded") and table["tiny"].rstrip().endswith("loaded")
    assert "KB" in table["tiny"] or "MB" in table["tiny"]
    assert "failed:" in table["missing"] and "HF_HUB_OFFLINE" in table["missing"]
    assert "missing" in table["gone"] and "does not exist" in table["gone"]
    assert set(ps) == {"local", "tiny"}
    assert ps["local"]["expires_at"].startswith("2318")  # keep_alive -1 → forever


def test_preload_stops_at_the_memory_budget_and_names_select(tmp_path: Path, tiny_llama: Path,
                                                             tiny_qwen2: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Each tiny model's weights take ~0.56 MB: the budget holds one.
    config = make_config(tmp_path, {"a": {"source": str(tiny_llama), "priority": 2, "aliases": ["first"]},
                                    "b": {"source": str(tiny_qwen2), "priority": 1}},
                         memory_budget="0.8MB")
    with serve(config) as server:
        rc = main(["--config", str(config.path), "preload", "--server", server.url])
        table = rows(capsys.readouterr().out)
        assert rc == 0  # a skip is by design, not a failure
        assert table["b"].rstrip().endswith("loaded")
        assert "skipped: over the memory budget" in table["a"]
        rc = main(["--config", str(config.path), "preload", "first", "nope", "--server", server.url])
        table = rows(capsys.readouterr().out)
    assert rc == 1
    assert set(table) == {"a", "nope"} and "not configured" in table["nope"]
    assert table["a"].rstrip().endswith("loaded")  # alone it fits (the server evicts b)


def test_preload_without_a_server(tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, {"a": {"source": str(tiny_llama)}})
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["--config", str(config.path), "preload", "--server", dead]) == 1
    assert "not warmed: could not connect" in capsys.readouterr().out
    assert main(["--config", str(config.path), "preload", "--no-warm", "--server", dead]) == 0
    assert rows(capsys.readouterr().out)["a"].rstrip().endswith("on disk")


def test_select_orders_by_priority_then_config_order(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"x": {"source": "o/x", "priority": 3}, "y": {"source": "o/y", "preload": True},
                                    "z": {"source": "o/z", "priority": 3, "preload": True}})
    assert [m.name for m in select(config, [], False)[0]] == ["x", "z", "y"]
    assert [m.name for m in select(config, [], True)[0]] == ["z", "y"]
    assert [m.name for m in select(config, ["y", "x"], False)[0]] == ["x", "y"]


def test_preload_downloads_what_is_missing_once(tmp_path: Path, online: FakeHub, hf_cache: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, {"tiny": {"source": "org/tiny"}})
    assert main(["--config", str(config.path), "preload", "--no-warm"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["tiny"].split()[1:3] == ["22", "MB"] and table["tiny"].rstrip().endswith("downloaded")
    assert len(online.gets) == 4
    assert main(["--config", str(config.path), "preload", "--no-warm"]) == 0
    assert rows(capsys.readouterr().out)["tiny"].rstrip().endswith("on disk")
    assert len(online.gets) == 4  # present and complete: the Hub is not even asked


def test_pull_command(tmp_path: Path, online: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, {"tiny": {"source": "org/tiny"}, "ghost": {"source": "org/ghost"}})
    assert main(["--config", str(config.path), "pull", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "downloaded" in out and out.rstrip().endswith("success")
    assert main(["--config", str(config.path), "pull", "tiny"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["--config", str(config.path), "pull", "ghost"]) == 1
    assert "org/ghost not found on the Hugging Face Hub" in capsys.readouterr().err
    assert main(["--config", str(config.path), "pull", "nope"]) == 1
    assert 'model "nope" not found' in capsys.readouterr().err


def test_pull_offline_and_incomplete(tmp_path: Path, hf_cache: Path, tiny_llama: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, {"tiny": {"source": "org/tiny"}, "other": {"source": "org/other"}})
    assert main(["--config", str(config.path), "pull", "other"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    snapshot = lay_out_cache(hf_cache, "org/tiny", tiny_llama)
    assert main(["--config", str(config.path), "pull", "tiny"]) == 0
    assert "up to date" in capsys.readouterr().out
    (snapshot / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert main(["--config", str(config.path), "pull", "tiny"]) == 1
    assert "missing weight shards: model-00002-of-00002.safetensors" in capsys.readouterr().err


def test_preload_models_script(tmp_path: Path, hf_cache: Path, tiny_llama: Path) -> None:
    script = REPO / "scripts" / "preload_models"
    assert os.access(script, os.X_OK)
    lay_out_cache(hf_cache, "org/tiny", tiny_llama)
    config = make_config(tmp_path, {"tiny": {"source": "org/tiny"}, "missing": {"source": "org/missing"}})
    done = subprocess.run([str(script), "--config", str(config.path), "--no-warm"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=os.environ.copy())
    assert done.returncode == 1, done.stderr
    table = rows(done.stdout)
    assert table["tiny"].rstrip().endswith("on disk")
    assert "HF_HUB_OFFLINE" in table["missing"]
    done = subprocess.run([str(script), "--config", str(config.path), "--no-warm", "tiny"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
