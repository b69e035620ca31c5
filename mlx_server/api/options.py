"""Ollama `options` → engine sampling settings, with Ollama's documented defaults and type checks.

Unknown keys are ignored (and logged), as Ollama does; a known key with the wrong JSON type is a 400.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from mlx_server.errors import BadRequest
from mlx_server.types import SamplingParams

log = logging.getLogger("mlx_server.api.options")

# Ollama's defaults (api/types.go DefaultOptions); num_ctx defaults to the model's context instead, see README.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1, "repeat_last_n": 64,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": -1, "num_predict": -1,
}
_FLOATS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
           "tfs_z", "mirostat_tau", "mirostat_eta"}
_INTS = {"top_k", "num_predict", "num_ctx", "repeat_last_n", "seed", "num_keep", "mirostat", "num_batch",
         "num_gpu", "main_gpu", "num_thread", "num_gqa"}
_BOOLS = {"penalize_newline", "numa", "low_vram", "f16_kv", "vocab_only", "use_mmap", "use_mlock", "logits_all",
          "embedding_only"}
# Accepted for compatibility but without effect on MLX (hardware placement, llama.cpp-only samplers).
_NO_EFFECT = {"typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "num_keep", "num_batch", "num_gpu",
              "main_gpu", "num_thread", "num_gqa", "penalize_newline", "numa", "low_vram", "f16_kv", "vocab_only",
              "use_mmap", "use_mlock", "logits_all", "embedding_only"}


def _check(key: str, value: Any) -> Any:
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"invalid option \"{key}\": expected a number, got {value!r}")
        return float(value)
    if key in _INTS:
        # int64 like Ollama's Go structs; float checks first, as int() of NaN / inf raises instead of comparing
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not value.is_integer()) or not -2**63 <= value < 2**63):
            raise BadRequest(f"invalid option \"{key}\": expected an integer, got {value!r}")
        return int(value)
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise BadRequest(f"invalid option \"{key}\": expected a boolean, got {value!r}")
        return value
    if key == "stop":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise BadRequest(f"invalid option \"stop\": expected an array of strings, got {value!r}")
        return value
    return value


def ollama_sampling(options: Any, model_defaults: Mapping[str, Any]
                    ) -> tuple[SamplingParams, Optional[int], Optional[int], tuple[str, ...]]:
    """(sampling, max_tokens, num_ctx, stop) from request options over per-model options over Ollama defaults."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("invalid value for field \"options\": expected an object")
    merged: dict[str, Any] = dict(OLLAMA_DEFAULTS)
    for source in (model_defaults, options):
        for key, value in source.items():
            if value is None:
                continue
            if key not in _FLOATS | _INTS | _BOOLS | {"stop"}:
                log.info("ignoring unknown option %r", key)
                continue
            if key in _NO_EFFECT:
                log.debug("option %r has no effect on MLX", key)
            merged[key] = _check(key, value)
    temperature = merged["temperature"]
    if temperature < 0:
        raise BadRequest("invalid option \"temperature\": must be >= 0")
    if not 0.0 <= merged["top_p"] <= 1.0:
        raise BadRequest("invalid option \"top_p\": must be between 0 and 1")
    if merged["top_k"] < 0:
        raise BadRequest("invalid option \"top_k\": must be >= 0")
    if merged["repeat_penalty"] <= 0:
        raise BadRequest("invalid option \"repeat_penalty\": must be > 0")
    seed = merged["seed"]
    sampling = SamplingParams(
        temperature=temperature, top_p=merged["top_p"], top_k=merged["top_k"], min_p=merged["min_p"],
        repeat_penalty=merged["repeat_penalty"], repeat_last_n=merged["repeat_last_n"],
        presence_penalty=merged["presence_penalty"], frequency_penalty=merged["frequency_penalty"],
        seed=None if seed is None or seed < 0 else seed)
    num_predict = merged["num_predict"]
    num_ctx = merged.get("num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise BadRequest("invalid option \"num_ctx\": must be positive")
    stop = tuple(merged.get("stop") or ())
    return sampling, (num_predict if num_predict and num_predict > 0 else None), num_ctx, stop
