"""Built-in chat templates for GGUFs that carry none (no MLX here: /api/show and the importer both use it).

A GGUF's own `tokenizer.chat_template` (Jinja) always wins. Many files have none — the Gemma 3 270M Q4_K_M file in
the tests, and Ollama's library GGUFs, whose template lives in a separate Go-template layer that this server does
not render. For those the template is picked by architecture and confirmed against the vocabulary (the family's
turn tokens must exist), never guessed silently: each built-in template starts with a Jinja comment naming it, so
/api/show shows which one is in use, and the import log says so.
"""

from __future__ import annotations

from typing import Iterable, Optional

_GEMMA = """{#- mlx-server built-in template: gemma (the GGUF has no chat template) -#}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim -}}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"""

_LLAMA3 = """{#- mlx-server built-in template: llama3 (the GGUF has no chat template) -#}
{{- bos_token -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"""

_CHATML = """{#- mlx-server built-in template: chatml (the GGUF has no chat template) -#}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

_PHI3 = """{#- mlx-server built-in template: phi3 (the GGUF has no chat template) -#}
{%- for message in messages -%}
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"""

_COMMAND_R = """{#- mlx-server built-in template: command-r (the GGUF has no chat template) -#}
{{- bos_token -}}
{%- set names = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'} -%}
{%- for message in messages -%}
{{- '<|START_OF_TURN_TOKEN|>' + names.get(message['role'], '<|USER_TOKEN|>') + message['content'] -}}
{{- '<|END_OF_TURN_TOKEN|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}{%- endif -%}"""

_MISTRAL = """{#- mlx-server built-in template: mistral (the GGUF has no chat template) -#}
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}
{%- elif message['role'] == 'user' -%}{{- '[INST] ' + ns.system + message['content'] + ' [/INST]' -}}
{%- set ns.system = '' -%}
{%- else -%}{{- ' ' + message['content'] + eos_token -}}
{%- endif -%}
{%- endfor -%}"""

# family → (template, tokens the vocabulary must have for it to apply)
_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gemma": (_GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "llama3": (_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "chatml": (_CHATML, ("<|im_start|>", "<|im_end|>")),
    "phi3": (_PHI3, ("<|user|>", "<|assistant|>", "<|end|>")),
    "command-r": (_COMMAND_R, ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>")),
    "mistral": (_MISTRAL, ("[INST]", "[/INST]")),
}
# Which families to try for an architecture, first match wins (a llama-architecture file may be Llama 3,
# a ChatML fine-tune, or Mistral).
_BY_ARCH: dict[str, tuple[str, ...]] = {
    "gemma": ("gemma",),
    "gemma2": ("gemma",),
    "gemma3": ("gemma",),
    "llama": ("llama3", "chatml", "mistral"),
    "qwen2": ("chatml",),
    "qwen3": ("chatml",),
    "phi3": ("phi3",),
    "command-r": ("command-r",),
}
# Tokens that end a turn in each family, beyond the file's eos: added to config.json's eos ids.
TURN_END = {
    "gemma": "<end_of_turn>",
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "phi3": "<|end|>",
    "command-r": "<|END_OF_TURN_TOKEN|>",
}


def builtin_family(arch: str, tokens: Iterable[str]) -> Optional[str]:
    """The built-in template family for a file of this architecture and vocabulary, or None."""
    vocab = tokens if isinstance(tokens, (set, frozenset)) else set(tokens)
    for family in _BY_ARCH.get(arch, ()):
        if all(t in vocab for t in _FAMILIES[family][1]):
            return family
    return None


def choose_template(arch: str, gguf_template: Optional[str], tokens: Iterable[str]) -> tuple[str, str]:
    """(which, template): ("gguf", its own) when the file has one, ("builtin:FAMILY", ours), or ("none", "")."""
    if gguf_template:
        return "gguf", gguf_template
    family = builtin_family(arch, tokens)
    if family is None:
        return "none", ""
    return f"builtin:{family}", _FAMILIES[family][0]


__all__ = ["TURN_END", "builtin_family", "choose_template"]
