"""Tool-call arguments stream as they are generated: the splitter's ToolCallDeltas, format by format."""

from __future__ import annotations

import json
import random
from typing import Any

from mlx_lm.tool_parsers import json_tools, mistral

from mlx_server.contract.events import ToolCallDelta
from mlx_server.engine.prepare.parsers import GENERIC_JSON, OutputSplitter, Parts, ToolFormat, parse_llama3_json

QWEN = ToolFormat("json_tools", "<tool_call>", "</tool_call>", json_tools.parse_tool_call)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", mistral.parse_tool_call)
LLAMA3 = ToolFormat("llama3_json", "<|python_tag|>", "", parse_llama3_json, leading_json=True)
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "f"}}]
ARGS: dict[str, Any] = {"city": "Paris", "days": [1, 2.5, None, True], "note": 'say "hi" } {', "nested": {"a": {}}}


def run(text: str, fmt: ToolFormat, step: int = 1, seed: int = 0) -> tuple[Parts, list[Parts]]:
    """Feed `text` in pieces of about `step` characters (random when step is 0); the total and every feed's Parts."""
    splitter = OutputSplitter(tools=fmt, tool_defs=TOOLS)
    rng, pos, steps = random.Random(seed), 0, []
    while pos < len(text):
        n = step or rng.randint(1, 7)
        steps.append(splitter.feed(text[pos : pos + n]))
        pos += n
    steps.append(splitter.finish())
    total = Parts()
    for part in steps:
        total += part
    return total, steps


def joined(parts: Parts, index: int) -> str:
    return "".join(p.arguments for p in parts.tool_call_deltas if p.index == index)


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_qwen_arguments_stream_and_join_to_the_final_arguments() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(ARGS, indent=2) + "}\n</tool_call>"
    for step in (1, 2, 3, 0):
        total, steps = run(text, QWEN, step)
        [call] = total.tool_calls
        assert call == {"function": {"name": "get_weather", "arguments": ARGS}} and total.content == ""
        # The first piece names the call before any argument; the name comes once.
        assert total.tool_call_deltas[0] == ToolCallDelta(0, name="get_weather")
        assert [p.name for p in total.tool_call_deltas[1:]] == [""] * (len(total.tool_call_deltas) - 1)
        # Joined, the pieces are exactly the arguments JSON the dialects write for the whole call.
        assert joined(total, 0) == compact(call["function"]["arguments"])
        # They came while the call was still being written, before the whole call was out.
        before = [p for part in steps if not part.tool_calls for p in part.tool_call_deltas]
        assert len(before) > 3


def test_two_blocks_are_numbered_and_text_stays_content() -> None:
    text = (
        'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    )
    total, _ = run(text, QWEN, 0)
    assert total.content == "Sure. " and len(total.tool_calls) == 2
    assert [(p.index, p.name) for p in total.tool_call_deltas if p.name] == [(0, "get_weather"), (1, "f")]
    assert (joined(total, 0), joined(total, 1)) == ('{"city":"Paris"}', '{"x":1}')


def test_string_arguments_and_name_after_arguments_come_whole_at_the_end() -> None:
    """Arguments written as a JSON string, or before the name, cannot be read as they come: one piece at the end."""
    for body in ('{"name": "f", "arguments": "{\\"x\\": 1}"}', '{"arguments": {"x": 1}, "name": "f"}'):
        total, steps = run(f"<tool_call>{body}</tool_call>", QWEN)
        assert total.tool_calls == [{"function": {"name": "f", "arguments": {"x": 1}}}]
        assert {p.index for p in total.tool_call_deltas} == {0} and joined(total, 0) == '{"x":1}'
        assert [p for p in total.tool_call_deltas if p.arguments] == steps[-2].tool_call_deltas[-1:]


def test_llama3_and_generic_json_stream_several_calls() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {"x": [1]}}'
    total, _ = run(text, LLAMA3)
    assert [c["function"]["name"] for c in total.tool_calls] == ["get_weather", "f"]
    assert (joined(total, 0), joined(total, 1)) == ('{"city":"Paris"}', '{"x":[1]}')
    total, _ = run('{"name": "get_weather", "arguments": {"city": "Paris"}}', GENERIC_JSON)
    assert joined(total, 0) == '{"city":"Paris"}' and len(total.tool_call_deltas) > 3


def test_json_answers_and_unknown_tools_open_no_call_early() -> None:
    """A JSON reply with a "name" key is not a call; a call to a tool not offered comes whole when it parses."""
    total, _ = run('{"name": "Bob", "age": 3}', GENERIC_JSON)
    assert not total.tool_call_deltas and not total.tool_calls and total.content
    total, steps = run('<tool_call>{"name": "other", "arguments": {"x": 1}}</tool_call>', QWEN)
    assert total.tool_call_deltas == [ToolCallDelta(0, name="other", arguments='{"x":1}')]
    assert total.tool_call_deltas == steps[-2].tool_call_deltas


def test_an_unfinished_call_gets_no_whole_call_and_its_text_is_content() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    total, _ = run(text, QWEN)
    assert total.tool_calls == [] and total.content == text
    assert total.tool_call_deltas[0] == ToolCallDelta(0, name="get_weather")
    assert joined(total, 0) == '{"city":"Par'


def test_mistral_calls_come_whole() -> None:
    total, _ = run('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', MISTRAL)
    assert total.tool_call_deltas == [ToolCallDelta(0, name="get_weather", arguments='{"city":"Paris"}')]
