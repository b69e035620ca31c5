"""Tool-call and thinking parsing: real formats, markers split anywhere, and the per-sequence output pipeline."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import mlx.core as mx
import ollama
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.tool_parsers import json_tools, mistral

from mlx_server.engine.model.output import LogprobReader, OutputStream, SequenceOutput, make_output
from mlx_server.engine.prepare.parsers import (GENERIC_JSON, OutputSplitter, Parts, ToolFormat, forced_tool_format, parse_llama3_json, request_tool_format, starts_in_thinking, think_markers, tool_format_for)
from mlx_server.engine.engine import Engine
from mlx_server.engine.prepare.prompt import render
from mlx_server.contract.events import Event, ToolCallDelta
from mlx_server.contract.requests import ChatMessage, GenerateRequest, ToolChoice
from support.serving import Server, make_config, serve
from support.thinking_model import build_thinking_model

QWEN = ToolFormat("json_tools", "<tool_call>", "</tool_call>", json_tools.parse_tool_call)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", mistral.parse_tool_call)
LLAMA3 = ToolFormat("llama3_json", "<|python_tag|>", "", parse_llama3_json, leading_json=True)
THINK = ("<think>", "</think>")
PARIS = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOKYO = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}


def chunkings(text: str, seed: int = 0) -> Iterator[list[str]]:
    """Whole, one character at a time, and a few random cuts: markers end up split at every position."""
    yield [text]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def split(text: str, **kw: Any) -> Iterator[Parts]:
    for pieces in chunkings(text):
        splitter = OutputSplitter(**kw)
        out = Parts()
        for piece in pieces:
            out += splitter.feed(piece)
        out += splitter.finish()
        yield out


# ---- tool calls -------------------------------------------------------------------------------------------------


def test_qwen_tool_call_never_leaks_into_content() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for out in split(text, tools=QWEN):
        assert out.content == "Let me check.\n"
        assert out.tool_calls == [PARIS]


def test_qwen_parallel_calls_and_text_after() -> None:
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Tokyo\\"}"}\n</tool_call>\nDone.')
    for out in split(text, tools=QWEN):
        assert out.tool_calls == [PARIS, TOKYO]  # string-encoded arguments become an object too
        assert out.content == "Done."


def test_malformed_call_is_returned_as_text() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    for out in split(text, tools=QWEN):
        assert out.tool_calls == []
        assert out.content == text


def test_unterminated_call_is_parsed_at_the_end() -> None:
    for out in split('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', tools=QWEN):
        assert out.tool_calls == [PARIS] and out.content == ""


def test_marker_like_text_is_released() -> None:
    for out in split("a <tool or <think-tank> b <", tools=QWEN, think=THINK):
        assert out.content == "a <tool or <think-tank> b <" and not out.tool_calls and not out.thinking


def test_llama3_bare_json_call() -> None:
    for out in split('{"name": "get_weather", "parameters": {"city": "Paris"}}', tools=LLAMA3):
        assert out.tool_calls == [PARIS] and out.content == ""
    for out in split('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Tokyo"}}', tools=LLAMA3):
        assert out.tool_calls == [TOKYO]


def test_llama3_json_that_is_not_a_call_stays_content() -> None:
    for text in ('{"answer": 42}', "The answer is {42}.", '  {"name": "x"}'):
        for out in split(text, tools=LLAMA3):
            assert out.content == text.lstrip() if text.startswith(" ") else out.content == text
            assert out.tool_calls == []


def test_llama3_several_calls() -> None:
    text = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_weather", "parameters": {"city": "Tokyo"}}')
    assert parse_llama3_json(text) == [{"name": "get_weather", "parameters": {"city": "Paris"}},
                                       {"name": "get_weather", "parameters": {"city": "Tokyo"}}]


def test_mistral_json_list_and_args_formats() -> None:
    old = 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
          '{"name": "get_weather", "arguments": {"city": "Tokyo"}}]'
    for out in split(old, tools=MISTRAL):
        assert out.content == "Sure. " and out.tool_calls == [PARIS, TOKYO]
    for out in split('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', tools=MISTRAL):
        assert out.tool_calls == [PARIS]


def test_without_tools_markers_are_plain_text() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    for out in split(text):
        assert out.content == text


def test_required_calls_are_forced_in_json_formats_only() -> None:
    """A grammar can force a JSON call; a model with no format, or a non-JSON one, is forced as generic JSON."""
    assert forced_tool_format(QWEN) is QWEN and forced_tool_format(LLAMA3) is LLAMA3
    assert forced_tool_format(None) is GENERIC_JSON and forced_tool_format(MISTRAL) is GENERIC_JSON


def test_generic_json_call_is_one_tool_call_and_no_text() -> None:
    for out in split('{"name": "get_weather", "arguments": {"city": "Paris"}}', tools=GENERIC_JSON):
        assert (out.content, out.thinking, out.tool_calls) == ("", "", [PARIS])
        assert "".join(p.arguments for p in out.tool_call_deltas) == '{"city":"Paris"}'
    for out in split('{"name": "get_weather", "arguments": {"city": "Tokyo"}}', tools=GENERIC_JSON,
                     think=THINK):
        assert (out.content, out.thinking, out.tool_calls) == ("", "", [TOKYO])


def test_request_tool_format_follows_tool_choice(qwen_tok: Any, tiny_llama3: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    auto = GenerateRequest(model="m", prompt="x", tools=tools)
    forced = GenerateRequest(model="m", prompt="x", tools=tools, force_tool=ToolChoice())
    assert request_tool_format(GenerateRequest(model="m", prompt="x"), qwen_tok) is None
    assert request_tool_format(auto, qwen_tok) == request_tool_format(forced, qwen_tok) == tool_format_for(qwen_tok)
    llama3 = load_tokenizer(tiny_llama3)
    assert request_tool_format(forced, llama3) == tool_format_for(llama3)


# ---- thinking ---------------------------------------------------------------------------------------------------


def test_thinking_then_answer() -> None:
    for out in split("<think>\nLet me think.\nYes.\n</think>\n\nThe answer is 4.", think=THINK):
        assert out.thinking == "Let me think.\nYes."
        assert out.content == "The answer is 4."


def test_output_that_starts_inside_thinking() -> None:
    for out in split("I should add.   </think>4", think=THINK, in_thinking=True):
        assert out.thinking == "I should add." and out.content == "4"


def test_think_false_drops_the_thinking() -> None:
    for out in split("<think>secret</think>visible", think=THINK, keep_thinking=False):
        assert out.thinking == "" and out.content == "visible"


def test_unfinished_thinking_is_still_thinking() -> None:
    for out in split("still thinking <", think=THINK, in_thinking=True):
        assert out.thinking == "still thinking <" and out.content == ""


def test_thinking_and_tool_call() -> None:
    text = ('<think>need weather</think>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    for out in split(text, think=THINK, tools=QWEN):
        assert out.thinking == "need weather" and out.content == "" and out.tool_calls == [PARIS]


def test_starts_in_thinking_reads_the_prompt_tail() -> None:
    assert starts_in_thinking("<|im_start|>assistant\n<think>\n", THINK)
    assert not starts_in_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)
    assert not starts_in_thinking("<|im_start|>assistant\n", THINK)
    assert not starts_in_thinking("<think>", None)


# ---- real tokenizers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tok(tiny_llama: Path) -> Any:
    return load_tokenizer(tiny_llama)


def test_formats_are_inferred_from_the_chat_template(qwen_tok: Any, tiny_llama3: Path) -> None:
    fmt = tool_format_for(qwen_tok)
    assert fmt is not None and (fmt.name, fmt.start, fmt.end) == ("json_tools", "<tool_call>", "</tool_call>")
    assert think_markers(qwen_tok) == THINK
    llama = tool_format_for(load_tokenizer(tiny_llama3))
    assert llama is not None and llama.name == "llama3_json" and llama.leading_json


def test_pipeline_over_real_tokens(qwen_tok: Any) -> None:
    """Token by token through detokenizer, stop strings and splitter, as the runner drives it."""
    text = '<think>hmm</think>Hi!<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    req = GenerateRequest(model="m", messages=[ChatMessage("user", "x")], tools=[{"type": "function"}])
    out = make_output(req, qwen_tok, qwen_tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    deltas = [d for t in qwen_tok.encode(text, add_special_tokens=False) if (d := out.add(t)) is not None]
    final = out.finish()
    deltas += [final] if final else []
    assert "".join(d.thinking for d in deltas) == "hmm"
    assert "".join(d.content for d in deltas) == "Hi!"
    assert [c for d in deltas for c in d.tool_calls] == [PARIS]
    pieces = [p for d in deltas for p in d.tool_call_deltas]
    assert pieces[0] == ToolCallDelta(0, name="get_weather") and len(pieces) > 2  # the arguments come token by token
    assert "".join(p.arguments for p in pieces) == '{"city":"Paris"}'
    assert out.made_tool_calls


def test_stop_string_is_reported(qwen_tok: Any) -> None:
    req = GenerateRequest(model="m", prompt="x", stop=("END",))
    out = make_output(req, qwen_tok, [1, 2])
    content = ""
    for t in qwen_tok.encode("one two END three", add_special_tokens=False):
        d = out.add(t)
        content += d.content if d else ""
        if out.stopped:
            break
    assert content == "one two " and out.stop_sequence == "END"


def test_logprobs_travel_with_the_visible_text(qwen_tok: Any) -> None:
    vocab = len(qwen_tok)
    ids = qwen_tok.encode("hello there", add_special_tokens=False)
    out = SequenceOutput(1, OutputStream(qwen_tok.detokenizer), OutputSplitter(),
                         LogprobReader(qwen_tok, top=3))
    deltas = []
    for t in ids:
        vec = mx.log(mx.softmax(mx.random.normal((vocab,), key=mx.random.key(t))))
        vec[t] = 0.0  # the chosen token is the most likely one
        d = out.add(t, vec)
        deltas += [d] if d else []
    final = out.finish()
    deltas += [final] if final else []
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in lps] == [qwen_tok.decode([t]) for t in ids]
    assert all(lp.logprob == 0.0 and len(lp.top) == 3 and lp.top[0] == (lp.token, 0.0) for lp in lps)


# ---- through the server: Ollama /api/chat gets the same parsing ---------------------------------------------------


WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}},
                   "required": ["city"], "additionalProperties": False}}}


class ForcingEngine(Engine):
    """Test seam: Ollama has no tool_choice, and a random-weight model never calls a tool on its own, so the
    decoding of requests with tools is forced into a call. Parsing and the dialect stay the real path."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.seen: list[GenerateRequest] = []

    def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        self.seen.append(request)
        if request.tools:
            request.force_tool = ToolChoice()
        return super().stream(request)


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ollama-parsing")
    thinker = build_thinking_model(tiny_llama, tmp / "thinker")
    cfg = make_config(tmp, {"tiny": {"source": str(tiny_llama)}, "thinker": {"source": str(thinker)}})
    with serve(cfg, engine=ForcingEngine(cfg)) as s:
        yield s


def test_ollama_chat_returns_parsed_tool_calls(server: Server) -> None:
    client = ollama.Client(host=server.url)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat(model="tiny", messages=msgs, tools=[WEATHER_TOOL], options={"num_predict": 80, "seed": 1})
    assert r.message.content == ""
    assert [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls or []] == \
        [("get_weather", {"city": "Paris"})]
    assert r.done_reason == "stop"  # Ollama says stop even when the reply is a tool call

    chunks = list(client.chat(model="tiny", messages=msgs, tools=[WEATHER_TOOL], stream=True,
                              options={"num_predict": 80, "seed": 2}))
    calls = [c for ch in chunks for c in (ch.message.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert "".join(ch.message.content or "" for ch in chunks) == ""
    assert chunks[-1].done and chunks[-1].done_reason == "stop"


def test_ollama_tool_results_go_back_into_the_template(server: Server) -> None:
    client = ollama.Client(host=server.url)
    client.chat(model="tiny", options={"num_predict": 1}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 degrees"}])
    runner = server.engine.core.pool.get("tiny").model.workers["generate"]
    prompt = runner.tokenizer.decode(render(server.engine.seen[-1], runner.tokenizer, "tiny"))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in prompt


def test_ollama_think_splits_and_drops(server: Server) -> None:
    client = ollama.Client(host=server.url)
    msgs = [{"role": "user", "content": "Add 2 and 2."}]
    r = client.chat(model="thinker", messages=msgs, think=True, options={"num_predict": 8, "seed": 3})
    assert r.message.thinking and r.message.content == ""  # output starts inside the template's open <think>
    chunks = list(client.chat(model="thinker", messages=msgs, think=True, stream=True,
                              options={"num_predict": 8, "seed": 3}))
    assert "".join(ch.message.thinking or "" for ch in chunks) == r.message.thinking
    dropped = client.chat(model="thinker", messages=msgs, think=False, options={"num_predict": 8, "seed": 3})
    assert not dropped.message.thinking and dropped.message.content == ""
