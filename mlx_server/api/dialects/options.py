"""Ollama `options`: their documented defaults and the JSON type each known key must have.

Unknown keys are ignored (and logged), as Ollama does; a known key with the wrong JSON type is a 400. The merge
with models.yaml and the dialect defaults is api/dialects/sampling.py's, shared by all three dialects.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from mlx_server.contract.errors import BadRequest

# Ollama's defaults (api/types.go DefaultOptions); num_ctx defaults to the model's context instead, see README.
OLLAMA_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.0,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": -1,
        "num_predict": -1,
    }
)
_FLOATS = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "tfs_z",
        "mirostat_tau",
        "mirostat_eta",
    }
)
_INTS = frozenset(
    {
        "top_k",
        "num_predict",
        "num_ctx",
        "repeat_last_n",
        "seed",
        "num_keep",
        "mirostat",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_gqa",
        "draft_num_predict",
    }
)
_BOOLS = frozenset(
    {
        "penalize_newline",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "logits_all",
        "embedding_only",
    }
)
# Accepted for compatibility but without effect on MLX (hardware placement, llama.cpp-only samplers).
NO_EFFECT = frozenset(
    {
        "typical_p",
        "tfs_z",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_gqa",
        "penalize_newline",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "logits_all",
        "embedding_only",
    }
)
KNOWN_OPTIONS = _FLOATS | _INTS | _BOOLS | frozenset({"stop", "num_ctx"})


def check_option(key: str, value: Any) -> Any:
    """The value in the engine's type, or a 400 naming the option (other keys pass through unchanged)."""
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f'invalid option "{key}": expected a number, got {value!r}')
        return float(value)
    if key in _INTS:
        # int64 like Ollama's Go structs; float checks first, as int() of NaN / inf raises instead of comparing
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
            or not -(2**63) <= value < 2**63
        ):
            raise BadRequest(f'invalid option "{key}": expected an integer, got {value!r}')
        return int(value)
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise BadRequest(f'invalid option "{key}": expected a boolean, got {value!r}')
        return value
    if key == "stop":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise BadRequest(f'invalid option "stop": expected an array of strings, got {value!r}')
        return value
    return value


__all__ = ["KNOWN_OPTIONS", "NO_EFFECT", "OLLAMA_DEFAULTS", "check_option"]
