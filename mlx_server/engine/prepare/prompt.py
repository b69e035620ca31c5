"""Prompt preparation: chat template, tokenization and fitting into the context window.

Pure Python over the tokenizer (no MLX arrays), so it runs in the preparation workers, never on the inference
thread: a 30,000-token prompt tokenizes without holding up anyone's decode step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Optional

from mlx_server.config.tree import ModelConfig
from mlx_server.contract.errors import BadRequest, ContextTooLong
from mlx_server.contract.requests import ChatMessage, GenerateRequest
from mlx_server.engine.prepare.parsers import function_defs, template_text

log = logging.getLogger("mlx_server.engine")


def render(req: GenerateRequest, tokenizer: Any, model: str) -> list[int]:
    """The request's prompt as token ids, through the model's chat template unless `raw`."""
    if req.prompt is not None and req.raw:
        return list(tokenizer.encode(req.prompt))
    return list(tokenizer.encode(prompt_text(req, tokenizer, model), add_special_tokens=False))


def prompt_text(
    req: GenerateRequest, tokenizer: Any, model: str, messages: Optional[list[dict[str, Any]]] = None
) -> str:
    """The templated prompt text; `messages` replaces the request's own (a vision prompt's content parts)."""
    tok = tokenizer
    if req.suffix:
        raise BadRequest(f'model "{model}" does not support insert (suffix)')
    if messages is None:
        messages = [m.to_template() for m in (req.messages or [])]
        if req.prompt is not None:
            messages = [{"role": "user", "content": req.prompt}]
    if req.system is not None:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": req.system})
    block = forced_tool_block(req, tok)
    if not getattr(tok, "has_chat_template", False):
        turns = _with_block(messages, block, "system") if block else messages
        return "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant: "
    kwargs: dict[str, Any] = {}
    if req.tools:
        kwargs["tools"] = req.tools
    if req.think is not None:
        kwargs["enable_thinking"] = req.think
    if req.think_level is not None:
        # gpt-oss (harmony) templates read the level as `reasoning_effort`; templates without it ignore the kwarg,
        # so a level there means no more than enable_thinking=True.
        kwargs["reasoning_effort"] = req.think_level
    # Some templates (Gemma's) refuse a system turn: the tool instructions then go into the first user turn.
    attempts = [_with_block(messages, block, role) for role in ("system", "user")] if block else [messages]
    for i, turns in enumerate(attempts):
        try:
            return str(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False, **kwargs))
        except Exception as exc:  # noqa: BLE001 - jinja errors name the template problem; the client sent them
            if i == len(attempts) - 1:
                raise BadRequest(f"chat template failed for these messages: {exc}") from None
    raise AssertionError("unreachable")


def with_default_system(req: GenerateRequest, system: Optional[str]) -> GenerateRequest:
    """`req` with the model's default system prompt (models.yaml `system`, an Ollama system layer) when it brings
    none of its own, as Ollama does; raw prompts are left alone (they skip the template)."""
    if not system or req.system is not None or req.raw or any(m.role == "system" for m in req.messages or ()):
        return req
    return replace(req, system=system)


def with_model_turns(req: GenerateRequest, model: ModelConfig) -> GenerateRequest:
    """`req` with its model's default system prompt and its MESSAGE turns (models.yaml `messages`, /api/create's
    `messages`) before the chat's own, after the chat's leading system turns (templates want system first)."""
    req = with_default_system(req, model.system)
    if not model.messages or req.messages is None or req.raw:
        return req
    turns = [ChatMessage(role=str(m.get("role", "user")), content=str(m.get("content", ""))) for m in model.messages]
    lead = next((i for i, m in enumerate(req.messages) if m.role != "system"), len(req.messages))
    return replace(req, messages=[*req.messages[:lead], *turns, *req.messages[lead:]])


class TemplatedTokenizer:
    """A tokenizer that renders with its model's configured chat template (`template`) instead of its own."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self._tokenizer = tokenizer
        self.chat_template = template
        self.has_chat_template = True

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer.apply_chat_template(*args, chat_template=self.chat_template, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def templated(tokenizer: Any, model: ModelConfig) -> Any:
    return TemplatedTokenizer(tokenizer, model.template) if model.template else tokenizer


def template_shows_tools(tokenizer: Any) -> bool:
    """Whether the chat template puts `tools` into the prompt. A Python renderer (no Jinja text) is trusted to."""
    if not getattr(tokenizer, "has_chat_template", False):
        return False
    text = template_text(tokenizer)
    return not text or "tools" in text


def forced_tool_block(req: GenerateRequest, tokenizer: Any) -> Optional[str]:
    """System-prompt text describing the tools and the generic JSON call, for a required call the template
    cannot describe (None otherwise). The grammar forces the call either way; this is what lets the model fill
    it with sensible arguments. Tools with tool_choice auto get nothing: without a format such a model answers
    in text, which is what clients that attach tools to every chat (Open WebUI) rely on."""
    if req.force_tool is None or not req.tools or template_shows_tools(tokenizer):
        return None
    return tool_instructions(req.tools, req.force_tool.name)


def tool_instructions(tools: list[dict[str, Any]], name: Optional[str]) -> str:
    lines = []
    for d in function_defs(tools, name):
        entry = {
            "name": d.get("name"),
            "description": d.get("description") or None,
            "parameters": d.get("parameters") or {"type": "object"},
        }
        lines.append(json.dumps({k: v for k, v in entry.items() if v is not None}, ensure_ascii=False))
    which = f'the tool "{name}"' if name is not None else "exactly one of these tools"
    return (
        f"Answer by calling {which}. Reply with only a JSON object of the form "
        '{"name": <tool name>, "arguments": <object of argument values>}.\n\n'
        "Tools:\n" + "\n".join(lines)
    )


def _with_block(messages: list[dict[str, Any]], block: str, role: str) -> list[dict[str, Any]]:
    """`messages` with `block` added to the first turn of `role` (a new turn at the start if there is none)."""
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == role:
            if isinstance(m["content"], list):  # content parts (images): the block is a text part of its own
                part = {"type": "text", "text": block}
                m["content"] = [*m["content"], part] if role == "system" else [part, *m["content"]]
            else:
                m["content"] = f"{m['content']}\n\n{block}" if role == "system" else f"{block}\n\n{m['content']}"
            return out
    return [{"role": role, "content": block}, *out]


@dataclass(frozen=True)
class Fitted:
    """A prompt cut to the request's context window, and the generation budget that is left."""

    tokens: list[int]
    num_ctx: int
    max_tokens: int
    truncated: int  # tokens dropped from the left


def window(req: GenerateRequest, context_length: int) -> int:
    return min(req.num_ctx or context_length, context_length)


def fit(tokens: list[int], req: GenerateRequest, context_length: int, model: str) -> Fitted:
    num_ctx = window(req, context_length)
    truncated = 0
    if len(tokens) >= num_ctx and not req.truncate:
        raise ContextTooLong(len(tokens), num_ctx)  # at least one token must be left to answer with
    if len(tokens) >= num_ctx:
        # Like Ollama: keep the most recent tokens, leaving room to answer.
        room = min(req.max_tokens or num_ctx // 2, num_ctx // 2)
        keep = max(1, num_ctx - max(room, 1))
        truncated = len(tokens) - keep
        tokens = tokens[-keep:]
        log.warning("prompt for %s truncated: %d tokens dropped to fit num_ctx=%d", model, truncated, num_ctx)
    if not tokens:
        raise BadRequest("prompt is empty after tokenization")
    max_tokens = num_ctx - len(tokens)
    if req.max_tokens is not None and req.max_tokens > 0:
        max_tokens = min(max_tokens, req.max_tokens)
    return Fitted(tokens=tokens, num_ctx=num_ctx, max_tokens=max_tokens, truncated=truncated)


def render_fitting(req: GenerateRequest, tokenizer: Any, context_length: int, model: str) -> list[int]:
    """The prompt's tokens, dropping the oldest messages whole until it fits the window, as Ollama's chat does:
    system messages and the latest message always stay (fit() then cuts tokens if even those do not fit)."""
    tokens = render(req, tokenizer, model)
    limit = window(req, context_length)
    messages = req.messages or []
    if len(tokens) < limit or not req.truncate or req.prompt is not None or len(messages) < 2:
        return tokens

    def kept(drop: int) -> list[int]:
        dropped = {i for i, m in enumerate(messages[:-1]) if m.role != "system"}
        cut = set(sorted(dropped)[:drop])
        return render(replace(req, messages=[m for i, m in enumerate(messages) if i not in cut]), tokenizer, model)

    droppable = sum(1 for m in messages[:-1] if m.role != "system")
    low, high, best = 1, droppable, None  # the fewest dropped messages that fit: renders grow with what is kept
    while low <= high:
        mid = (low + high) // 2
        attempt = kept(mid)
        if len(attempt) < limit:
            best, high = attempt, mid - 1
        else:
            low = mid + 1
    if best is None:
        return kept(droppable)
    log.warning("prompt for %s: the oldest messages were dropped to fit num_ctx=%d", model, limit)
    return best


# Ollama's num_keep default: what a context shift keeps of a prompt whose system part cannot be told apart.
DEFAULT_KEEP = 4


def shift_keep(req: GenerateRequest, tokenizer: Any, tokens: list[int], model: str) -> int:
    """Tokens at the head of `tokens` that a context shift keeps: the system prompt and the tools (the tokens the
    prompt shares with the same request whose conversation is one placeholder turn), never fewer than `num_keep`.
    A raw prompt has no system part to find: `num_keep` or Ollama's default."""
    if req.num_keep is not None and req.num_keep < 0:
        return len(tokens) - 1
    wanted = req.num_keep if req.num_keep is not None else 0
    if req.raw:
        return min(req.num_keep if req.num_keep is not None else DEFAULT_KEEP, len(tokens) - 1)
    lead = [m for m in req.messages or [] if m.role == "system"]
    placeholder = replace(req, prompt="\u00a7", messages=None) if req.prompt is not None else None
    try:
        probe = render(
            placeholder or replace(req, messages=[*lead, ChatMessage(role="user", content="\u00a7")]), tokenizer, model
        )
    except BadRequest:
        probe = []
    common = 0
    for a, b in zip(tokens, probe, strict=False):
        if a != b:
            break
        common += 1
    return min(max(common, wanted), len(tokens) - 1)


__all__ = [
    "DEFAULT_KEEP",
    "Fitted",
    "fit",
    "render_fitting",
    "shift_keep",
    "forced_tool_block",
    "prompt_text",
    "render",
    "template_shows_tools",
    "tool_instructions",
]
