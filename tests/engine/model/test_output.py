"""Stop strings and partial UTF-8 over a real tokenizer's streaming detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.engine.model.output import OutputStream, StopMatcher


@pytest.mark.parametrize("chunks,stops,want", [
    (["hel", "lo wo", "rld"], ["wor"], "hello "),
    (["abc", "STO", "P", "def"], ["STOP"], "abc"),
    (["aS", "T", "x"], ["STOP"], "aSTx"),  # a partial match that fails is released
    (["x", "y"], [], "xy"),
    (["one END two"], ["END", "one"], ""),  # the earliest stop wins
])
def test_stop_matcher(chunks: list[str], stops: list[str], want: str) -> None:
    m = StopMatcher(stops)
    out = "".join(m.feed(c) for c in chunks) + m.flush()
    assert out == want


def test_partial_stop_is_held_not_emitted() -> None:
    m = StopMatcher(["</end>"])
    assert m.feed("text </e") == "text "
    assert m.feed("nd>") == ""
    assert m.stopped


def test_multibyte_characters_never_split(tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    text = "café ✓ 日本語 🚀 done"
    ids = tok.encode(text, add_special_tokens=False)
    out = OutputStream(tok.detokenizer, ())
    pieces = [out.add(t) for t in ids] + [out.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_over_detokenizer(tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    out = OutputStream(tok.detokenizer, ("ma del",))
    text = ""
    for t in ids:
        text += out.add(t)
        if out.stopped:
            break
    assert text == "alpha beta gam"
