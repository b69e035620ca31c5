"""models.yaml per-model `options` applied the same way in every dialect.

Precedence, field by field: what the request sets explicitly > the model's `options` in models.yaml > the
dialect's documented default. Option names are Ollama's (models.yaml uses them); the OpenAI and Anthropic
dialects hand their fields in under those names (`max_tokens` as `num_predict`, `stop_sequences` as `stop`).
So a Claude Code user of a model configured with `temperature: 0.2` gets 0.2 unless the request says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

from mlx_server.api.dialects.options import KNOWN_OPTIONS, NO_EFFECT, OLLAMA_DEFAULTS, check_option
from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import SamplingParams

log = logging.getLogger("mlx_server.api.dialects.sampling")

# OpenAI's and Anthropic's documented defaults (temperature 1, top_p 1, no penalties, no top_k); the knobs they
# lack (min_p, repeat_penalty) are neutral. num_predict -1: until the context is full.
NEUTRAL_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 64,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": -1,
        "num_predict": -1,
    }
)
OPENAI_DEFAULTS = NEUTRAL_DEFAULTS
ANTHROPIC_DEFAULTS = NEUTRAL_DEFAULTS
# /v1/completions documents max_tokens 16 when absent
OPENAI_COMPLETIONS_DEFAULTS: Mapping[str, Any] = MappingProxyType({**NEUTRAL_DEFAULTS, "num_predict": 16})


@dataclass(frozen=True)
class Resolved:
    sampling: SamplingParams
    max_tokens: Optional[int]  # None: until the context is full
    num_ctx: Optional[int]  # None: the model's configured context length
    stop: tuple[str, ...]
    num_draft: Optional[int] = None  # draft_num_predict: tokens drafted per step; None = the model's num_draft
    num_keep: Optional[int] = None  # tokens at the prompt's head a context shift keeps; None = the system prompt


def _layer(merged: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    for key, value in source.items():
        if value is None:  # JSON null = not set, so the layer below shows through
            continue
        if key not in KNOWN_OPTIONS:
            log.info("ignoring unknown option %r (%s)", key, where)
            continue
        if key in NO_EFFECT:
            log.debug("option %r has no effect on MLX", key)
        merged[key] = check_option(key, value)


def resolve_sampling(
    model_options: Mapping[str, Any], request: Mapping[str, Any], defaults: Mapping[str, Any]
) -> Resolved:
    """Merge dialect defaults < models.yaml options < request fields, then check the ranges of the result.

    `request` uses Ollama option names; a None value means the request did not set it. Ollama's lenient rules
    hold for both layers: unknown keys are ignored (logged), a known key of the wrong JSON type is a 400.
    """
    merged: dict[str, Any] = dict(defaults)
    _layer(merged, model_options, "models.yaml")
    _layer(merged, request, "request")
    if merged["temperature"] < 0:
        raise BadRequest('invalid option "temperature": must be >= 0')
    if not 0.0 <= merged["top_p"] <= 1.0:
        raise BadRequest('invalid option "top_p": must be between 0 and 1')
    if merged["top_k"] < 0:
        raise BadRequest('invalid option "top_k": must be >= 0')
    if merged["repeat_penalty"] <= 0:
        raise BadRequest('invalid option "repeat_penalty": must be > 0')
    num_ctx = merged.get("num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise BadRequest('invalid option "num_ctx": must be positive')
    num_draft = merged.get("draft_num_predict")
    if num_draft is not None and num_draft < 0:
        raise BadRequest('invalid option "draft_num_predict": must be >= 0')
    seed = merged["seed"]
    sampling = SamplingParams(
        temperature=merged["temperature"],
        top_p=merged["top_p"],
        top_k=merged["top_k"],
        min_p=merged["min_p"],
        repeat_penalty=merged["repeat_penalty"],
        repeat_last_n=merged["repeat_last_n"],
        presence_penalty=merged["presence_penalty"],
        frequency_penalty=merged["frequency_penalty"],
        seed=None if seed is None or seed < 0 else seed,
    )
    num_predict = merged["num_predict"]
    return Resolved(
        sampling,
        num_predict if num_predict and num_predict > 0 else None,
        num_ctx,
        tuple(s for s in merged.get("stop") or () if s),
        num_draft,
        merged.get("num_keep"),
    )


__all__ = [
    "ANTHROPIC_DEFAULTS",
    "OLLAMA_DEFAULTS",
    "OPENAI_COMPLETIONS_DEFAULTS",
    "OPENAI_DEFAULTS",
    "Resolved",
    "resolve_sampling",
]
