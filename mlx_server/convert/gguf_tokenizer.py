"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) rebuilt from a GGUF's metadata, without torch.

transformers' GGUF tokenizer converter works from gguf-py's metadata and needs no torch (its GGUF *model* path
does); it knows sentencepiece (llama, gemma, phi3) and byte-level BPE vocabularies. What it leaves out, added here:
llama.cpp's digit splitting for some byte-level vocabularies, BOS as the file says, and the chat template.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from mlx_server.models.chat_templates import TURN_END, builtin_family

# llama.cpp pre-tokenizers that split every digit off before the GPT-2 regex
# (llama-vocab.cpp: "\p{N}" then the GPT-2 pattern). The HF originals spell that
# Digits(individual_digits=True) + ByteLevel(use_regex=True); transformers' GGUF converter drops it.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"})


def _converter() -> tuple[Callable[..., Any], Mapping[str, str]]:
    # transformers 5 moved the GGUF tokenizer code; both homes expose the same two names.
    for module_name in ("transformers.integrations.gguf.gguf_tokenizer_mapping", "transformers.integrations.ggml"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "convert_gguf_tokenizer"):
            return module.convert_gguf_tokenizer, module.GGUF_TOKENIZER_MAPPING["tokenizer"]
    raise RuntimeError("this transformers version has no GGUF tokenizer converter")


def special_ids(fields: Mapping[str, Any]) -> dict[str, Any]:
    """bos_token_id / eos_token_id for config.json; eos lists every id that ends a turn (Llama 3's eot, Gemma's
    <end_of_turn>), since chat models stop on those rather than on eos."""
    tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
    out: dict[str, Any] = {}
    for name in ("bos", "eos"):
        token_id = fields.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            out[f"{name}_token_id"] = int(token_id)
    ends = [out["eos_token_id"]] if "eos_token_id" in out else []
    eot = fields.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        ends.append(int(eot))
    family = builtin_family(str(fields.get("general.architecture", "")), tokens)
    if family in TURN_END:
        try:
            ends.append(tokens.index(TURN_END[family]))
        except ValueError:
            pass
    ends = list(dict.fromkeys(ends))
    if len(ends) > 1:
        out["eos_token_id"] = ends
    return out


def save_tokenizer(fields: Mapping[str, Any], out: Path, context_length: int, chat_template: Optional[str]) -> None:
    """Write the tokenizer files for the GGUF whose metadata is `fields` (plain Python values) into `out`."""
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    convert, key_map = _converter()
    picked = {name: fields[f"tokenizer.{key}"] for key, name in key_map.items() if f"tokenizer.{key}" in fields}
    if "tokens" not in picked:
        raise ValueError("the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    backend, _ = convert(fields["general.architecture"], picked)
    tokens: list[str] = picked["tokens"]
    if fields.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )

    def token_id(kind: str) -> Optional[int]:
        value = fields.get(f"tokenizer.ggml.{kind}_token_id")
        return int(value) if value is not None and int(value) < len(tokens) else None

    def token(kind: str) -> Optional[str]:
        found = token_id(kind)
        return None if found is None else tokens[found]

    bos, bos_id = token("bos"), token_id("bos")
    # llama.cpp prepends BOS for sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", fields.get("tokenizer.ggml.model") == "llama"))
    # Set either way: a converter's own default may disagree with the file's flag.
    prefix = [bos] if add_bos and bos is not None else []
    backend.post_processor = processors.TemplateProcessing(
        single=[*prefix, "$A"], pair=[*prefix, "$A", *prefix, "$B:1"], special_tokens=[(bos, bos_id)] if prefix else []
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=chat_template or None,
        clean_up_tokenization_spaces=False,
        model_max_length=context_length,
    )
    wrapped.save_pretrained(str(out))


_DONE = ".complete"


def tokenizer_files(fields: Mapping[str, Any], out: Path, context_length: int, template: str, shared: Path) -> None:
    """The tokenizer files in `out`, built once per GGUF into `shared` and copied from there into each mode's
    import: rebuilding a 262,144-token vocabulary's merges takes longer than converting a small model's weights."""
    if not (shared / _DONE).is_file():
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{shared.name}-", dir=shared.parent))
        try:
            save_tokenizer(fields, tmp, context_length, template)
            (tmp / _DONE).write_text("")  # last: its presence means complete
            try:
                os.rename(tmp, shared)
            except OSError:
                if not (shared / _DONE).is_file():  # lost a race to a complete copy is fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for item in shared.iterdir():
        if item.name != _DONE:
            shutil.copy2(item, out / item.name)


__all__ = ["save_tokenizer", "special_ids", "tokenizer_files"]
