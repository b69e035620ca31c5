"""convert/quantize.py through models/children.py's quantize_child: a tiny float llama quantized in a child
process by mlx_lm's conversion, offline, then loaded and run by mlx_lm itself."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlx_server.convert.quantize import quantize_dir
from mlx_server.models.children import ChildCancelled, ChildFailed, quantize_child
from mlx_server.models.quantize import QuantMode, quant_mode
from support.tinymodels import build_tiny_model

PROMPT = [1, 17, 42, 99, 7, 256, 300]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bfloat16, as most HF checkpoints ship; the source's own file layout is what the result must keep.
    src = build_tiny_model(tmp_path_factory.mktemp("float") / "tiny", dtype="bfloat16", seed=5)
    (src / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    (src / "pytorch_model.bin").write_bytes(b"weights in a format the conversion replaces")
    return src


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _logits(model: nn.Module) -> mx.array:
    return model(mx.array(PROMPT)[None])[0]


def _relative_rms(got: mx.array, want: mx.array) -> float:
    a, b = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def _greedy(model: nn.Module, n: int) -> list[int]:
    steps = generate_step(mx.array(PROMPT), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    return [int(token) for token, _ in steps]


def test_quantize_to_8_bits(float_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "created" / "tiny-8bit-g64"
    lines: list[str] = []
    assert quantize_child(float_model, out, QuantMode(8, 64), on_line=lines.append) == out
    assert any("MLX 8-bit, group size 64" in line for line in lines)
    assert lines[-1].startswith("quantized tiny:")
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no build dir left beside it

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    # Everything but the weights and config is the source's own file, byte for byte; other weights are not copied.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (float_model / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists() and not (out / "chat_template.jinja").exists()

    model, tokenizer = load(str(out))
    reference, ref_tokenizer = load(str(float_model))
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert model.layers[0].self_attn.q_proj.bits == 8
    q_proj = model.layers[0].self_attn.q_proj
    weights = mx.dequantize(q_proj.weight, q_proj.scales, q_proj.biases, group_size=64, bits=8)
    # ~0.9% with bfloat16 scales and biases (4-bit codes: ~9%)
    assert _relative_rms(weights, reference.layers[0].self_attn.q_proj.weight) < 0.02
    # The whole model stays near the float one (a random tiny model amplifies rounding: bfloat16 alone adds ~2%).
    assert _relative_rms(_logits(model), _logits(reference)) < 0.15
    assert len(_greedy(model, 6)) == 6
    messages = [{"role": "user", "content": "hello"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == ref_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    )


def test_quantize_to_4_bits_and_reuse(float_model: Path, tmp_path: Path) -> None:
    mode = quant_mode("q4_K_M")
    assert mode == QuantMode(4, 64)
    out = tmp_path / "tiny-4bit"
    assert quantize_child(float_model, out, mode) == out
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    model, _ = load(str(out))
    assert model.layers[0].mlp.down_proj.bits == 4
    assert len(_greedy(model, 6)) == 6
    # A second create of the same target finds it built.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert quantize_child(float_model, out, mode, on_line=lines.append) == out
    assert lines == ["tiny-4bit is already built"] and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_already_quantized_model_is_refused(float_model: Path, tmp_path: Path) -> None:
    quantized = quantize_child(float_model, tmp_path / "q8", QuantMode(8, 64))
    with pytest.raises(ChildFailed, match="q8 is already quantized .* quantize needs a float16, bfloat16 or float32"):
        quantize_child(quantized, tmp_path / "q8-again", QuantMode(4, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


def test_a_crashed_builds_leftovers_go_and_only_they(float_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-q4"
    crashed = tmp_path / ".tmp-tiny-q4-0123abcd"
    (crashed / "model").mkdir(parents=True)
    (crashed / "model" / "model.safetensors").write_bytes(b"half")
    sibling = tmp_path / ".tmp-tiny-q4-g32-0123abcd"  # another target's build, whose name starts the same
    sibling.mkdir()
    assert quantize_child(float_model, out, QuantMode(4, 32)) == out
    assert not crashed.exists() and sibling.exists()


def test_cancel_leaves_nothing(float_model: Path, tmp_path: Path) -> None:
    # The test holds the dir's build lock, as a concurrent build would: the child says what it will do and waits
    # for the lock, so the cancel reaches it mid-create whatever the machine's load (a tiny model's whole build
    # can otherwise finish before SIGTERM lands).
    cancel = threading.Event()
    out = tmp_path / "tiny-cancelled"
    lock = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ChildCancelled):
            quantize_child(float_model, out, QuantMode(4, 64), on_line=lambda _: cancel.set(), cancel=cancel)
    finally:
        os.close(lock)
    assert list(tmp_path.iterdir()) == []


def test_a_build_stopped_midway_removes_its_dir(float_model: Path, tmp_path: Path) -> None:
    # What the child's SIGTERM handler does (SystemExit), raised where mlx_lm's conversion is under way.
    def say(line: str) -> None:
        if line == "Quantizing":
            assert [p.name.startswith(".tmp-tiny-q4-") for p in tmp_path.iterdir()] == [True]
            raise SystemExit(143)

    with pytest.raises(SystemExit):
        quantize_dir(float_model, tmp_path / "tiny-q4", QuantMode(4, 64), say)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_and_sources(float_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ChildFailed, match="is not a model directory"):
        quantize_child(tmp_path / "nowhere", tmp_path / "out", QuantMode(4, 64))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ChildFailed, match="not a complete model dir: no tokenizer"):
        quantize_child(broken, tmp_path / "out", QuantMode(4, 64))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ChildFailed, match="exists and is not a quantized model dir"):
        quantize_child(float_model, tmp_path / "taken", QuantMode(4, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]


@pytest.mark.parametrize("argv", [["a", "b", "7", "64"], ["a", "b", "4", "48"], ["a", "b", "4"], ["a", "b", "x", "64"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from mlx_server.convert.quantize import main

    assert main(argv) == 2
    assert "usage: python -m mlx_server.convert.quantize" in capsys.readouterr().err
