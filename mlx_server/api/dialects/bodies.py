"""The scalar fields of OpenAI and Anthropic request bodies, as pydantic models: JSON types and ranges in one place.

Strict, so a JSON type is never coerced (`"1"` is not a number, `true` not an integer), and open (`extra`),
since both APIs grow fields faster than we follow and unknown ones are ignored. Structured fields (messages,
tools, formats) stay `Any` here: the dialect translates them and reports their errors field by field.
A validation error becomes a 400 in each dialect's own wording (see `validated`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from mlx_server.contract.errors import BadRequest

INT64 = 2**63  # seeds reach the engine as int64, as in Ollama's Go structs


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise PydanticCustomError("stop_type", "expected a string or an array of strings")


Stop = Annotated[tuple[str, ...], PlainValidator(_stop)]


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value)
    )


def _embedding_input(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's `input`: a text, texts, one token-id array or token-id arrays (never mixed, never empty)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return tuple(value)
        if _token_ids(value):
            return (tuple(value),)
        if all(_token_ids(v) for v in value):
            return tuple(tuple(v) for v in value)
    raise PydanticCustomError(
        "input_type",
        "expected a string, a non-empty array of strings, an array of token "
        "ids or an array of non-empty token-id arrays",
    )


Seed = Annotated[Optional[int], Field(ge=-INT64, lt=INT64)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(min_length=1)


class OpenAIBody(_Body):
    stream: bool = False
    stream_options: Any = None
    stop: Stop = ()
    seed: Seed = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    prompt_cache_key: Optional[str] = Field(None, max_length=1024)
    # Not OpenAI's, but sent by clients written for llama.cpp / vLLM servers
    top_k: Optional[int] = Field(None, ge=0, lt=INT64)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(None, ge=0.01, le=10)

    def sampling_fields(self) -> dict[str, Any]:
        """The request layer for api.sampling.resolve_sampling, under Ollama's option names (None = unset)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": list(self.stop) or None,
        }


class ChatCompletionBody(OpenAIBody):
    messages: Any = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    reasoning_effort: Any = None
    reasoning: Any = None
    think: Any = None


class CompletionBody(OpenAIBody):
    prompt: Any = None
    suffix: Any = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)


class EmbeddingBody(_Body):
    input: Annotated[tuple[str | tuple[int, ...], ...], PlainValidator(_embedding_input)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, lt=INT64)
    user: Optional[str] = None


class CountTokensBody(_Body):
    messages: Any = None
    system: Any = None
    tools: Any = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: Any = None
    output_format: Any = None


class MessagesBody(CountTokensBody):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: Stop = ()
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, lt=INT64)

    def sampling_fields(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "num_predict": self.max_tokens,
            "stop": list(self.stop_sequences) or None,
        }


B = TypeVar("B", bound=_Body)
Wording = Literal["openai", "anthropic"]


def validated(kind: type[B], body: dict[str, Any], wording: Wording) -> B:
    """`body` as `kind`, or a 400 naming the first bad field: OpenAI's `invalid value for field "x": …`, or
    Anthropic's `x.0.y: …` (its own API answers in pydantic's words: "max_tokens: Field required")."""
    # JSON null means "not set" in both APIs; dropping nulls lets the defaults apply, as they would if absent.
    try:
        return kind.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        if wording == "anthropic":
            raise BadRequest(f"{where}: {first['msg']}") from None
        raise BadRequest(f'invalid value for field "{where}": {first["msg"]}') from None


__all__ = [
    "ChatCompletionBody",
    "CompletionBody",
    "CountTokensBody",
    "EmbeddingBody",
    "MessagesBody",
    "OpenAIBody",
    "validated",
]
