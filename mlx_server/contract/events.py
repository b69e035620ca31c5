"""What the engine sends back for a request: Started, Delta, Embeddings or Scores, then one Done or Failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from mlx_server.contract.errors import MlxServerError


@dataclass(frozen=True)
class Started:
    """The prompt is tokenized and admitted; counts are known before any token is generated."""

    request_id: int
    model: str
    prompt_tokens: int
    cached_tokens: int
    load_duration: float  # seconds spent loading the model for this request (0 when resident)
    truncated: int = 0  # prompt tokens dropped from the left to fit num_ctx


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call as the model writes it, for dialects that stream calls (Anthropic, OpenAI, Responses).

    Every call comes as pieces under one `index` (0, 1, … over the reply's calls): the first carries the name,
    the rest the arguments' JSON text, in order. Where the model's format lets arguments be read while they are
    written, they come as they are generated (whitespace outside strings dropped); otherwise they come in one
    piece when the call is complete. A call that parses also comes whole in `Delta.tool_calls`, and then its
    pieces joined are JSON whose value equals its arguments. A call that turns out not to parse gets no whole call
    and no further pieces: its text comes out as content, as an unparseable call always has.
    """

    index: int
    name: str = ""  # on the call's first piece only
    arguments: str = ""  # the next piece of the arguments' JSON text


@dataclass(frozen=True)
class Delta:
    """Newly decoded output. `content` and `thinking` never contain stop strings or partial UTF-8.

    `tool_calls` are complete, validated calls in Ollama's shape (Ollama and non-streaming replies use them);
    `tool_call_deltas` are the same calls piece by piece as they are generated (streaming replies use them).
    """

    request_id: int
    content: str = ""
    thinking: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_deltas: tuple[ToolCallDelta, ...] = ()
    tokens: int = 0  # generated tokens this delta accounts for
    logprobs: tuple[TokenLogprob, ...] = ()


DoneReason = Literal["stop", "length", "load", "unload", "cancelled", "timeout", "tool_calls"]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    load_duration: float = 0.0
    prompt_eval_duration: float = 0.0
    eval_duration: float = 0.0
    total_duration: float = 0.0
    draft_tokens: int = 0  # tokens drafted for it (speculative decoding) ...
    draft_accepted: int = 0  # ... and how many of them the target kept


@dataclass(frozen=True)
class Done:
    request_id: int
    model: str
    reason: DoneReason
    usage: Usage
    stop_sequence: Optional[str] = None  # the stop string that ended the output, when one did
    window: bool = False  # a "length" end that came from the context window filling, not the request's max tokens


@dataclass(frozen=True, eq=False)
class Embeddings:
    """An EmbedRequest's result, one row per input in input order: float32, shape (inputs, dimensions)."""

    request_id: int
    model: str
    vectors: Any  # numpy.ndarray: kept as one array so 1,000 vectors cross threads without 384,000 floats
    prompt_tokens: int  # tokens embedded, after truncation


@dataclass(frozen=True)
class Failed:
    """The request ended with an error; after Started this becomes an in-stream error line."""

    request_id: int
    error: MlxServerError


@dataclass(frozen=True, eq=False)
class Scores:
    """A RerankRequest's result: one relevance score in [0, 1] per document, in document order (float32)."""

    request_id: int
    model: str
    scores: Any  # numpy.ndarray, shape (documents,)
    prompt_tokens: int  # tokens scored (every pair, after truncation)


Event = Union[Started, Delta, Embeddings, Done, Failed, Scores]

Sink = Callable[[Event], None]
"""Where a request's events go; the engine calls it from its own threads."""
