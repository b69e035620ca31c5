"""The small subset of Ollama's Go templates that a request's `template` field uses in practice.

Supports `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}` and `{{ if .X }}…{{ end }}` blocks (with an
optional `{{ else }}`); whitespace-trimming markers (`{{-`, `-}}`) are honoured. Anything else is a 400, since
silently rendering a different prompt than the client asked for would be worse.
"""

from __future__ import annotations

import re

from mlx_server.contract.errors import BadRequest

_TAG = re.compile(r"(\s*)\{\{(-?)\s*(.*?)\s*(-?)\}\}(\s*)", re.S)


def render_go_template(template: str, *, prompt: str, system: str = "", response: str = "") -> str:
    values = {".System": system, ".Prompt": prompt, ".Response": response}
    out: list[str] = []
    stack: list[bool] = []  # emitting state per open `if`
    pos = 0
    for m in _TAG.finditer(template):
        lead, trim_left, expr, trim_right, trail = m.groups()
        text = template[pos : m.start()] + ("" if trim_left else lead)
        if all(stack):
            out.append(text)
        pos = m.end() - (0 if trim_right else len(trail))
        if expr in values:
            if all(stack):
                out.append(values[expr])
        elif expr.startswith("if "):
            key = expr[3:].strip()
            if key not in values:
                raise BadRequest(f"unsupported template condition {{{{ {expr} }}}}")
            stack.append(bool(values[key]))
        elif expr == "else":
            if not stack:
                raise BadRequest("template has {{ else }} without {{ if }}")
            stack[-1] = not stack[-1]
        elif expr == "end":
            if not stack:
                raise BadRequest("template has {{ end }} without {{ if }}")
            stack.pop()
        else:
            raise BadRequest(f"unsupported template expression {{{{ {expr} }}}}")
    if stack:
        raise BadRequest("template has an unclosed {{ if }}")
    out.append(template[pos:])
    return "".join(out)
