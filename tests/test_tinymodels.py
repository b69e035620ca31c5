"""The tiny test checkpoints behave like real ones as far as mlx_lm can tell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from support.tinymodels import build_tiny_model, reference_greedy

PROMPTS = ["Hello, how are you?", "The weather in Paris is", "1 2 3 4 5", "def add(a, b):"]

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            # Both argument encodings occur in the wild (Ollama: object,
            # OpenAI: JSON string), so the template must take either.
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 14}'},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "Paris 14, Tokyo 21."},
    {"role": "user", "content": "Thanks"},
]


def chat_ids(tokenizer: TokenizerWrapper, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "tiny_llama3"])
def any_model(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def test_loads_with_mlx_lm(any_model: Path) -> None:
    model, tokenizer = load(str(any_model))
    config = json.loads((any_model / "config.json").read_text())
    assert isinstance(tokenizer, TokenizerWrapper)
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    assert len(tokenizer) == config["vocab_size"]
    logits = model(mx.array([chat_ids(tokenizer, "hi")]))
    assert logits.shape[-1] == config["vocab_size"]


def test_qwen2_has_biases_and_tied_head(tiny_qwen2: Path) -> None:
    model, _ = load(str(tiny_qwen2))
    attn = model.model.layers[0].self_attn
    assert "bias" in attn.q_proj and "bias" in attn.k_proj and "bias" in attn.v_proj
    assert not hasattr(model, "lm_head")


def test_greedy_output_is_varied(any_model: Path) -> None:
    _, tokenizer = load(str(any_model))
    continuations = []
    for prompt in PROMPTS:
        out = reference_greedy(any_model, chat_ids(tokenizer, prompt), 30, stop_at_eos=False)
        assert len(out) == 30
        assert len(set(out)) > 5, out
        continuations.append(tuple(out))
    assert len(set(continuations)) == len(PROMPTS)


def test_default_models_do_not_stop_early(any_model: Path) -> None:
    # Server tests compare long greedy runs, so an accidental EOS would make
    # them vacuous; the shrunken special-token head rows prevent that.
    _, tokenizer = load(str(any_model))
    for prompt in PROMPTS:
        assert len(reference_greedy(any_model, chat_ids(tokenizer, prompt), 30)) == 30


def test_eos_row_scale_makes_generation_stop(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path, arch="qwen2", eos_row_scale=5.0)
    _, tokenizer = load(str(model_dir))
    lengths = [len(reference_greedy(model_dir, chat_ids(tokenizer, p), 40)) for p in PROMPTS]
    assert any(n < 40 for n in lengths), lengths


def test_eos_is_recognised(tiny_qwen2: Path, tiny_llama3: Path) -> None:
    _, chatml = load(str(tiny_qwen2))
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert chatml.eos_token == "<|im_end|>"
    assert im_end in chatml.eos_token_ids

    _, llama3 = load(str(tiny_llama3))
    assert llama3.eos_token == "<|eot_id|>"
    assert llama3.convert_tokens_to_ids("<|eot_id|>") in llama3.eos_token_ids
    assert len(llama3.eos_token_ids) == 2
    assert llama3.bos_token == "<|begin_of_text|>"


@pytest.mark.parametrize("text", ["café 123 ✓", "Hello, world! 3.14 {\"a\": [1, 2]}\n\tend", "日本語 🙂 x²"])
def test_tokenizer_round_trips(tiny_llama: Path, tiny_qwen2: Path, text: str) -> None:
    # Both paths matter: transformers picks a different tokenizer class for
    # model_type qwen2 and they must still agree.
    _, a = load(str(tiny_llama))
    _, b = load(str(tiny_qwen2))
    ids = a.encode(text, add_special_tokens=False)
    assert ids == b.encode(text, add_special_tokens=False)
    assert a.decode(ids) == text


def test_markers_are_single_visible_tokens(tiny_llama: Path) -> None:
    _, tokenizer = load(str(tiny_llama))
    for marker in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1
        # Not special, so they survive skip_special_tokens for the parsers.
        assert tokenizer.decode(ids, skip_special_tokens=True) == marker
    assert tokenizer.decode(tokenizer.encode("<|im_end|>"), skip_special_tokens=True) == ""
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"


def test_streaming_detokenizer_matches_decode(tiny_llama: Path) -> None:
    _, tokenizer = load(str(tiny_llama))
    text = "The weather in Paris: 14 degrees, café ✓\nok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer
    detok.reset()
    pieces = []
    for token in ids:
        detok.add_token(token)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text

    generated = reference_greedy(tiny_llama, chat_ids(tokenizer, "hi"), 30)
    detok.reset()
    for token in generated:
        detok.add_token(token)
    detok.finalize()
    assert detok.text == tokenizer.decode(generated).lstrip(" ")


def test_chatml_template_renders_tools_and_results(tiny_qwen2: Path) -> None:
    _, tokenizer = load(str(tiny_qwen2))
    out = tokenizer.apply_chat_template(
        TOOL_CONVERSATION, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False
    )
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in out
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call><|im_end|>\n'
    ) in out
    # Consecutive tool results share one user turn, as in Qwen2.5.
    assert (
        "<|im_start|>user\n<tool_response>\n{\"temp\": 14}\n</tool_response>\n"
        "<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
    ) in out
    assert out.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.tool_parser('{"name": "f", "arguments": {}}') == {"name": "f", "arguments": {}}


def test_chatml_template_defaults_and_thinking(tiny_qwen2: Path) -> None:
    _, tokenizer = load(str(tiny_qwen2))
    msgs = [{"role": "user", "content": "hi"}]
    plain = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert plain == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_think = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_think == plain + "<think>\n\n</think>\n\n"
    history = msgs + [{"role": "assistant", "content": "hello", "reasoning_content": "greet"}]
    rendered = tokenizer.apply_chat_template(history, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\ngreet\n</think>\n\nhello<|im_end|>\n")


def test_llama3_template_renders_tools_and_results(tiny_llama3: Path) -> None:
    _, tokenizer = load(str(tiny_llama3))
    out = tokenizer.apply_chat_template(
        TOOL_CONVERSATION, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False
    )
    assert out.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert json.dumps(WEATHER_TOOL, indent=4) in out
    assert '{"name": "get_weather", "parameters": {"city": "Tokyo"}}<|eot_id|>' in out
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>' in out
    assert out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.tool_parser is None
    ids = tokenizer.apply_chat_template(TOOL_CONVERSATION, add_generation_prompt=True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_padding_grows_file_but_loads(tmp_path: Path) -> None:
    small = build_tiny_model(tmp_path / "small", arch="qwen2")
    big = build_tiny_model(tmp_path / "big", arch="qwen2", padding_bytes=1_000_000)
    small_size = (small / "model.safetensors").stat().st_size
    big_size = (big / "model.safetensors").stat().st_size
    assert 1_000_000 <= big_size - small_size < 1_000_200
    model_small, tok = load(str(small))
    model_big, _ = load(str(big))
    prompt = mx.array([chat_ids(tok, "hi")])
    assert mx.array_equal(model_small(prompt), model_big(prompt))


def test_bigger_config_and_dtype(tmp_path: Path) -> None:
    model_dir = build_tiny_model(
        tmp_path, arch="llama", hidden_size=128, num_layers=3, num_heads=8,
        num_kv_heads=4, dtype="bfloat16",
    )
    model, tokenizer = load(str(model_dir))
    assert len(model.model.layers) == 3
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert len(reference_greedy(model_dir, chat_ids(tokenizer, "hi"), 5)) == 5


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", arch="qwen2", seed=3)
    b = build_tiny_model(tmp_path / "b", arch="qwen2", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
