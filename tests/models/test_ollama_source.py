"""`source: ollama:NAME` against fake Ollama stores built in tmp_path from tiny GGUFs: names, manifests, layers,
bad blobs, models.yaml merging, and the `mlx-server import ollama:NAME` / `mlx-server ollama list` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support.gguf_builders import random_blocks, tiny_llama_gguf
from mlx_server.cli import main
from mlx_server.config.load import ModelConfig, build_config
from mlx_server.models.diagnose import where_looked
from mlx_server.convert import gguf as gguf_import
from mlx_server.models.ollama_store import OllamaError, Ref, defaults, list_store, read_manifest
from mlx_server.models.sources import locate
from support.ollama_store import add_model


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "models"
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    add_model(root, "tiny:1b", gguf, params={"stop": ["<|endoftext|>"], "temperature": 0.3, "num_ctx": 64},
              system="Be brief.")
    add_model(root, "tiny:1b", gguf, namespace="someone")
    iq = tiny_llama_gguf(tmp_path / "iq.gguf", {"blk.0.ffn_down.weight": (
        "IQ4_XS", random_blocks("IQ4_XS", 256, 512, np.random.default_rng(0)))})
    add_model(root, "iq:latest", iq)
    add_model(root, "mamba:latest", tiny_llama_gguf(tmp_path / "mamba.gguf", arch="mamba"))
    add_model(root, "llava:7b", gguf, projector=b"GGUF clip projector")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def test_names_follow_ollamas_rules() -> None:
    assert Ref.parse("gemma3:270m") == Ref("registry.ollama.ai", "library", "gemma3", "270m")
    assert Ref.parse("ollama:qwen2.5-coder") == Ref("registry.ollama.ai", "library", "qwen2.5-coder", "latest")
    assert Ref.parse("someone/tiny:1b") == Ref("registry.ollama.ai", "someone", "tiny", "1b")
    assert Ref.parse("hf.co/org/repo:Q4_K_M") == Ref("hf.co", "org", "repo", "Q4_K_M")
    assert Ref.parse("hf.co/org/repo:Q4_K_M").display == "hf.co/org/repo:Q4_K_M"
    with pytest.raises(OllamaError):
        Ref.parse("a/b/c/d")


def test_store_listing_and_layers(store: Path) -> None:
    names = [m.ref.display for m in list_store(store)]
    assert names == ["iq:latest", "llava:7b", "mamba:latest", "someone/tiny:1b", "tiny:1b"]
    manifest = read_manifest("tiny:1b")
    assert manifest.params() == {"stop": ["<|endoftext|>"], "temperature": 0.3, "num_ctx": 64}
    assert manifest.text("system") == "Be brief." and manifest.text("template") is None
    with pytest.raises(OllamaError, match=rf"not in the Ollama store {store}.*ollama pull nope:latest"):
        read_manifest("nope")


def test_locate_checks_the_blob(store: Path) -> None:
    found = locate(ModelConfig(name="t", source="ollama:tiny:1b"))
    assert found.kind == "ollama" and found.present and found.path.name.startswith("sha256-")
    blob = found.path
    blob.write_bytes(blob.read_bytes()[:-10])  # a download cut short
    truncated = locate(ModelConfig(name="t", source="ollama:tiny:1b"))
    assert not truncated.present and "truncated" in truncated.hint and "ollama pull tiny:1b" in truncated.hint
    blob.unlink()
    assert "is missing" in locate(ModelConfig(name="t", source="ollama:tiny:1b")).hint
    assert str(store) in locate(ModelConfig(name="g", source="ollama:ghost")).hint
    # doctor and /health say where they looked and what fixes it
    looked, fix = where_looked(ModelConfig(name="g", source="ollama:ghost"), None)
    assert looked == str(store / "manifests/registry.ollama.ai/library/ghost/latest")
    assert fix == "ollama pull ghost:latest"


def test_models_yaml_options_win_over_the_params_layer(store: Path) -> None:
    config = build_config({"models": {
        "a": {"source": "ollama:tiny:1b", "options": {"temperature": 0.9}},
        "b": {"source": "ollama:tiny:1b", "system": "Be long."},
        "c": {"source": "ollama:someone/tiny:1b"}, "d": {"source": "ollama:ghost"}}}, env={}, layers=defaults)
    a, b, c, d = (config.models[k] for k in "abcd")
    assert a.options == {"stop": ["<|endoftext|>"], "temperature": 0.9, "num_ctx": 64} and a.system == "Be brief."
    assert b.system == "Be long." and b.options["temperature"] == 0.3
    assert c.options == {} and c.system is None
    assert d.options == {} and d.system is None  # not there: the model fails with the store's message when used


def test_ollama_list_says_what_can_be_served(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ollama", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert rows["tiny:1b"].split()[1] == "llama" and "Q4_Kx7" in rows["tiny:1b"] and rows["tiny:1b"].endswith("yes")
    assert "no: unsupported tensor type IQ4_XS" in rows["iq:latest"]
    assert "no: unsupported architecture 'mamba'" in rows["mamba:latest"]
    assert "no: a vision model (GGUF + projector layer)" in rows["llava:7b"]
    assert "source: ollama:llava:7b" not in out
    assert "  tiny:1b:\n    source: ollama:tiny:1b" in out and "source: ollama:someone/tiny:1b" in out
    assert "source: ollama:iq:latest" not in out


def test_import_ollama_model_with_progress_then_reuse(store: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "ollama:tiny:1b", "--cache-dir", str(tmp_path / "cache")]) == 0
    captured = capsys.readouterr()
    model_dir = Path(captured.out.splitlines()[0])
    assert (model_dir / "config.json").is_file() and json.loads((model_dir / "config.json").read_text())[
        "model_type"] == "llama"
    assert "importing tiny:1b [##############################] 100%" in captured.err
    assert "chat template none" in captured.err  # a byte-level vocabulary without any family's turn tokens
    assert "source: ollama:tiny:1b" in captured.out
    assert main(["import", "ollama:tiny:1b", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(model_dir)
    assert main(["import", "ollama:ghost", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "not in the Ollama store" in capsys.readouterr().err


def test_not_enough_disk_is_refused_before_writing(store: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk cannot be made for a test; the free-space reading is what decides, so that is what is set.
    monkeypatch.setattr(gguf_import, "_free_bytes", lambda path: 10 * 2**20)
    blob = read_manifest("tiny:1b").model_blob()
    with pytest.raises(OSError, match=r"not enough disk space .* it needs 0\.\d GiB, 0\.0 GiB are free"):
        gguf_import.import_gguf(blob, tmp_path / "cache", mode="quantized-f32")
    leftovers = [p for p in (tmp_path / "cache" / "imports").iterdir() if not p.name.startswith(".")]
    assert leftovers == [] and not any((tmp_path / "cache" / "imports").glob(".tmp-*/*.safetensors"))
