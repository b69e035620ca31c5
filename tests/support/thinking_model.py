"""A tiny model whose chat template opens `<think>` in the generation prompt, like DeepSeek-R1 distills.

Its output therefore starts inside thinking, whatever `enable_thinking` says (R1 distills ignore it too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from support.tiny_templates import CHATML_TEMPLATE

_GENERATION = "{%- if add_generation_prompt -%}"
R1_TEMPLATE = (CHATML_TEMPLATE[: CHATML_TEMPLATE.index(_GENERATION)]
               + _GENERATION + '{{- "<|im_start|>assistant\\n<think>\\n" -}}{%- endif -%}\n')


def build_thinking_model(src: Path, dst: Path) -> Path:
    """Copy a tiny ChatML checkpoint and give it the R1-style template."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = R1_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst
