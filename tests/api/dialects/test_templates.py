"""The Go-template subset used by Ollama's `template` request field."""

from __future__ import annotations

import pytest

from mlx_server.api.dialects.templates import render_go_template
from mlx_server.contract.errors import BadRequest


def test_prompt_and_system() -> None:
    t = "{{ if .System }}<sys>{{ .System }}</sys>\n{{ end }}<user>{{ .Prompt }}</user>"
    assert render_go_template(t, prompt="hi", system="be brief") == "<sys>be brief</sys>\n<user>hi</user>"
    assert render_go_template(t, prompt="hi") == "<user>hi</user>"


def test_else_and_trim_markers() -> None:
    t = "A {{- if .System }} S {{- else }} N {{- end }} {{ .Prompt }}"
    assert render_go_template(t, prompt="p") == "A N p"
    assert render_go_template(t, prompt="p", system="x") == "A S p"


@pytest.mark.parametrize("t", ["{{ .Messages }}", "{{ if .Prompt }}x", "{{ end }}", "{{ range .Tools }}{{ end }}"])
def test_unsupported_is_a_400(t: str) -> None:
    with pytest.raises(BadRequest):
        render_go_template(t, prompt="p")
