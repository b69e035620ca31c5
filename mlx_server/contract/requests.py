"""The engine contract: what a dialect hands the engine and what it gets back.

Nothing here imports MLX, so the HTTP side can build requests and read events without touching the GPU.
Every message that crosses the thread boundary is one of these dataclasses.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union


def next_request_id() -> int:
    # Random 63-bit ids need no shared counter (no module state) and never collide in practice.
    return secrets.randbits(63)


class Priority(enum.IntEnum):
    # Lower value is served first; IntEnum so a heap can order waiting requests directly.
    HIGH = 0
    MEDIUM = 1
    LOW = 2

    @classmethod
    def parse(cls, value: Optional[str]) -> "Priority":
        if not value:
            return cls.MEDIUM
        try:
            return cls[value.strip().upper()]
        except KeyError:
            return cls.MEDIUM


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; defaults are neutral (the dialects apply their own documented defaults)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class ChatMessage:
    role: str
    content: str = ""
    thinking: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_name: Optional[str] = None
    tool_call_id: Optional[str] = None
    # Base64 image data (a data: URL prefix tolerated), or an http(s) URL where server.fetch_image_urls allows its
    # host; decoded and checked in the preparation stage, never on the event loop.
    images: Optional[list[str]] = None

    def to_template(self) -> dict[str, Any]:
        """The dict shape chat templates expect (HF convention)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_name:
            out["name"] = self.tool_name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class ToolChoice:
    """A required tool call: `name` None means any of the request's tools (OpenAI "required", Anthropic "any")."""

    name: Optional[str] = None


@dataclass
class GenerateRequest:
    """One generation, already resolved to a configured model name and engine-level settings.

    Exactly one of `messages` (chat) or `prompt` (completion) is set. `prompt` with `raw=True` is tokenized
    as is; otherwise it is wrapped in the chat template as a single user turn (Ollama /api/generate semantics).
    Loading, unloading and counting are requests of their own kinds (below), never an empty GenerateRequest.
    """

    generates: ClassVar[bool] = True  # its events carry generated tokens (metrics count them)
    model: str
    messages: Optional[list[ChatMessage]] = None
    prompt: Optional[str] = None
    system: Optional[str] = None
    suffix: Optional[str] = None
    images: Optional[list[str]] = None  # prompt mode (/api/generate): the prompt's images, as ChatMessage.images
    raw: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    think: Optional[bool] = None
    think_level: Optional[str] = None  # "low" | "medium" | "high": a reasoning effort, for templates that take one
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: Optional[int] = None  # None = until the context is full
    num_ctx: Optional[int] = None  # None = the model's configured context length
    stop: tuple[str, ...] = ()
    keep_alive: Optional[float] = None  # seconds; None = model/server default; <0 forever; 0 unload when idle
    priority: Priority = Priority.MEDIUM
    format: Optional[Union[Literal["json"], dict[str, Any]]] = None
    logprobs: bool = False
    top_logprobs: int = 0
    timeout: Optional[float] = None  # seconds from submission; None = no limit
    force_tool: Optional[ToolChoice] = None  # constrain the reply to one call of the request's tools
    num_draft: Optional[int] = None  # tokens drafted per step (Ollama's draft_num_predict); None = the model's
    # A prompt longer than the context: True cuts it as Ollama does (the oldest messages whole, system messages and
    # the latest kept; a raw prompt from the left); False refuses it (ContextTooLong), as OpenAI and Anthropic do.
    truncate: bool = True
    # A generation that fills the window: True drops the oldest half of what follows the kept head (the system
    # prompt, or `num_keep` tokens) and goes on, as Ollama's context shift does; False ends it with "length" (the
    # window flag set), as OpenAI and Anthropic do. Ollama's default is true.
    shift: bool = False
    num_keep: Optional[int] = None  # Ollama's num_keep: tokens at the prompt's head a shift keeps (-1: the prompt)
    cache_key: Optional[str] = None  # OpenAI's prompt_cache_key: a session whose stored prompt cache is one entry
    request_id: int = field(default_factory=next_request_id)
    created: float = field(default_factory=time.monotonic)  # arrival: Ollama's durations include queue and load


@dataclass(frozen=True)
class LoadRequest:
    """Make the model resident (Ollama's empty /api/generate or /api/chat); ends with Done(reason="load")."""

    generates: ClassVar[bool] = False
    model: str
    keep_alive: Optional[float] = None
    priority: Priority = Priority.MEDIUM
    timeout: Optional[float] = None
    request_id: int = field(default_factory=next_request_id)
    created: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class UnloadRequest:
    """Unload the model once idle (Ollama's empty request with keep_alive 0); ends with Done(reason="unload")."""

    generates: ClassVar[bool] = False
    model: str
    priority: Priority = Priority.MEDIUM
    timeout: Optional[float] = None
    request_id: int = field(default_factory=next_request_id)
    created: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class CountTokensRequest:
    """Render and tokenize `request` as a generation would, generate nothing, never load or evict a model.

    Ends with Done(reason="stop") whose usage.prompt_tokens is the count.
    """

    generates: ClassVar[bool] = False
    request: GenerateRequest
    priority: Priority = Priority.MEDIUM
    timeout: Optional[float] = None
    request_id: int = field(default_factory=next_request_id)
    created: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> str:
        return self.request.model


@dataclass(frozen=True)
class EmbedRequest:
    """Embed each input (a text, or token ids as OpenAI allows); ends with Embeddings, then Done(reason="stop").

    Vectors are pooled as the model's files say and L2-normalized (Ollama's behaviour); with `dimensions`, cut to
    that width and normalized again (Matryoshka). `truncate=False` makes an input longer than the context an
    error naming its index, instead of cutting it.
    """

    generates: ClassVar[bool] = False
    model: str
    inputs: tuple[Union[str, tuple[int, ...]], ...] = ()
    truncate: bool = True
    dimensions: Optional[int] = None
    normalize: bool = True  # False: vectors as pooled (Ollama's legacy /api/embeddings)
    num_ctx: Optional[int] = None  # None = the model's context length
    keep_alive: Optional[float] = None
    priority: Priority = Priority.MEDIUM
    timeout: Optional[float] = None
    request_id: int = field(default_factory=next_request_id)
    created: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class RerankRequest:
    """Score how relevant each document is to `query`; ends with Scores, then Done(reason="stop").

    Each (query, document) pair is read as one input by a reranker (a cross-encoder, or a decoder asked a yes/no
    question): one score in [0, 1] per document, in document order; ordering and `top_n` are the dialect's.
    A pair longer than the context is cut from the document's end, never the query's.
    """

    generates: ClassVar[bool] = False
    model: str
    query: str
    documents: tuple[str, ...] = ()
    instruction: Optional[str] = None  # a decoder reranker's task line (Qwen3-Reranker's "Instruct"); None: its own
    num_ctx: Optional[int] = None  # None = the model's context length
    keep_alive: Optional[float] = None
    priority: Priority = Priority.MEDIUM
    timeout: Optional[float] = None
    request_id: int = field(default_factory=next_request_id)
    created: float = field(default_factory=time.monotonic)


EngineRequest = Union[GenerateRequest, LoadRequest, UnloadRequest, CountTokensRequest, EmbedRequest, RerankRequest]
