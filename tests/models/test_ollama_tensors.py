"""Ollama's safetensors (-mlx) models: a store laid out as Ollama's MLX runner keeps them (one safetensors blob per
tensor, MLX-quantized weights with `.scale` / `.bias`, config and tokenizer as JSON layers), built from a tiny llama
quantized by MLX itself in four modes; assembled into a model dir it computes exactly what the quantized model did,
and the server serves it as `ollama:NAME`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from mlx_server.models.ollama_store import OllamaError, read_manifest
from mlx_server.models.ollama_tensors import model_dir
from mlx_server.ops.ollama_cli import run_import, run_list
from support.ollama_store import MEDIA, add_blob
from support.serving import make_config, serve

# Per module: Ollama's quant_type and the MLX parameters it stands for.
MODES = {"q_proj": ("int4", 32, 4, "affine"), "k_proj": ("int4", 32, 4, "affine"), "v_proj": ("int8", 64, 8, "affine"),
         "o_proj": ("nvfp4", 16, 4, "nvfp4"), "gate_proj": ("mxfp8", 32, 8, "mxfp8"),
         "up_proj": ("int4", 32, 4, "affine"), "down_proj": ("int8", 64, 8, "affine")}


def quantized_reference(tiny_llama: Path) -> tuple[Any, Any]:
    model, tokenizer = load(str(tiny_llama))

    def choose(path: str, module: nn.Module) -> Any:
        kind = path.rsplit(".", 1)[-1]
        if kind not in MODES or not hasattr(module, "to_quantized"):
            return False
        _, group, bits, mode = MODES[kind]
        return {"group_size": group, "bits": bits, "mode": mode}

    nn.quantize(model, class_predicate=choose)
    return model, tokenizer


def blob_bytes(arrays: dict[str, mx.array], metadata: dict[str, str]) -> bytes:
    path = Path(f"/tmp/ollama-tensor-{id(arrays)}.safetensors")
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    data = path.read_bytes()
    path.unlink()
    return data


def ollama_store(root: Path, name: str, model: Any, source: Path) -> None:
    """One tensor layer per weight (a quantized one with its scales and biases, Ollama's names), JSON layers."""
    params = dict(tree_flatten(model.parameters()))
    layers = []
    for key in sorted(params):
        if key.endswith((".scales", ".biases")):
            continue
        module = key.removesuffix(".weight")
        if f"{module}.scales" in params:
            quant_type, group, _, _ = MODES[module.rsplit(".", 1)[-1]]
            arrays = {key: params[key], f"{key}.scale": params[f"{module}.scales"]}
            if f"{module}.biases" in params:
                arrays[f"{key}.bias"] = params[f"{module}.biases"]
            data = blob_bytes(arrays, {"quant_type": quant_type, "group_size": str(group)})
        else:
            data = blob_bytes({key: params[key]}, {})
        layers.append({"mediaType": MEDIA + "tensor", **add_blob(root, data), "name": key})
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        layers.append({"mediaType": MEDIA + "json", **add_blob(root, (source / file).read_bytes()), "name": file})
    model_name, _, tag = name.partition(":")
    path = root / "manifests" / "registry.ollama.ai" / "library" / model_name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"mediaType": "application/vnd.docker.container.image.v1+json",
              **add_blob(root, b'{"model_format":"safetensors"}')}
    path.write_text(json.dumps({"schemaVersion": 2, "config": config, "layers": layers, "runner": "mlx"}))


@pytest.fixture(scope="module")
def store(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("ollama") / "models"
    model, _ = quantized_reference(tiny_llama)
    ollama_store(root, "tiny:mlx", model, tiny_llama)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OLLAMA_MODELS", str(root))
        yield root


def test_the_assembled_model_computes_what_the_quantized_model_did(store: Path, tiny_llama: Path,
                                                                   tmp_path: Path) -> None:
    reference, _ = quantized_reference(tiny_llama)
    assembled = model_dir(read_manifest("tiny:mlx", store), tmp_path)
    quant = json.loads((assembled / "config.json").read_text())["quantization"]
    assert quant["model.layers.0.self_attn.o_proj"] == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    model, _ = load(str(assembled))
    tokens = mx.array([[1, 17, 42, 99, 300, 7]])
    assert mx.array_equal(model(tokens), reference(tokens))  # bit for bit: the same packed weights, the same kernels
    assert model_dir(read_manifest("tiny:mlx", store), tmp_path) == assembled  # reused, not assembled again


def test_a_corrupt_blob_is_refused_by_its_digest(store: Path, tmp_path: Path) -> None:
    manifest = read_manifest("tiny:mlx", store)
    layer = next(x for x in manifest.layers if x.kind == "tensor")
    blob = layer.path(store)
    good = blob.read_bytes()
    try:
        blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit off
        with pytest.raises(OllamaError, match="does not match its digest"):
            model_dir(manifest, tmp_path)
    finally:
        blob.write_bytes(good)
    assert not list((tmp_path / "ollama-mlx").iterdir()), "nothing half-assembled is left"


def test_import_assembles_it_ahead_of_time(store: Path, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_import("ollama:tiny:mlx", tmp_path, None, out, err) == 0, err.getvalue()
    assembled = Path(out.getvalue().splitlines()[0])
    assert (assembled / "config.json").is_file() and list(assembled.glob("model-*.safetensors"))
    assert "source: ollama:tiny:mlx" in out.getvalue()


def test_ollama_list_calls_it_servable(store: Path) -> None:
    out = io.StringIO()
    run_list(store, out)
    row = next(line for line in out.getvalue().splitlines() if line.startswith("tiny:mlx"))
    assert "llama" in row and "safetensors" in row and row.rstrip().endswith("yes"), row
    assert "source: ollama:tiny:mlx" in out.getvalue()


def test_served_as_an_ollama_source(store: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """The same answers as the quantized model saved the ordinary way (a model dir with its quantization config)."""
    reference, _ = quantized_reference(tiny_llama)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    mx.save_safetensors(str(ref_dir / "model.safetensors"), dict(tree_flatten(reference.parameters())))
    cfg = json.loads((tiny_llama / "config.json").read_text())
    per_module = {f"model.layers.{i}.{part}.{kind}": {"group_size": g, "bits": b, "mode": m}
                  for i in range(cfg["num_hidden_layers"]) for kind, (_, g, b, m) in MODES.items()
                  for part in ("self_attn", "mlp") if (kind.endswith("_proj") and
                                                       (part == "mlp") == (kind in ("gate_proj", "up_proj", "down_proj")))}
    (ref_dir / "config.json").write_text(json.dumps({**cfg, "quantization": {"group_size": 32, "bits": 4,
                                                                             **per_module}}))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (ref_dir / file).write_bytes((tiny_llama / file).read_bytes())
    config = make_config(tmp_path, {"tiny:mlx": {"source": "ollama:tiny:mlx"}, "ref": {"source": str(ref_dir)}})
    with serve(config) as s, s.client(timeout=120) as c:
        answers = {}
        for model in ("tiny:mlx", "ref"):
            r = c.post("/api/generate", json={"model": model, "prompt": "the river runs", "stream": False,
                                              "options": {"temperature": 0, "num_predict": 16}})
            assert r.status_code == 200, r.text
            answers[model] = r.json()["response"]
        show = c.post("/api/show", json={"model": "tiny:mlx"}).json()
    assert answers["tiny:mlx"] == answers["ref"] and answers["ref"]
    assert show["details"]["format"] == "safetensors" and show["details"]["family"] == "llama"
