"""The Anthropic dialect's requests: /v1/messages and /v1/messages/count_tokens bodies as contract requests.

Content blocks map onto ChatMessage fields (text → content, thinking → thinking, tool_use → tool_calls,
tool_result → a `tool` message), so the model's own chat template renders them. Claude Code's per-session
`x-anthropic-billing-header` system block is left out of the prompt. Sampling is request field > models.yaml
option > Anthropic's default (temperature 1), see api/dialects/sampling.py.
"""

from __future__ import annotations

from typing import Any, Optional

from mlx_server.api.dialects.base import Call, Incoming
from mlx_server.api.dialects.bodies import CountTokensBody, MessagesBody, validated
from mlx_server.api.dialects.compat import new_id
from mlx_server.api.dialects.images import IMAGE_TAG, anthropic_image
from mlx_server.api.dialects.sampling import ANTHROPIC_DEFAULTS, resolve_sampling
from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import ChatMessage, CountTokensRequest, GenerateRequest, ToolChoice


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest(f"{where}: content must be a string or an array of content blocks")
    return content


def _plain(content: Any, where: str) -> tuple[str, Optional[list[str]]]:
    """tool_result / system content: a string or blocks; text joined, each image an [img] tag at its place."""
    if content is None:
        return "", None
    texts, images = [], []
    for j, b in enumerate(_blocks(content, where)):
        if b.get("type") == "text":
            texts.append(str(b.get("text") or ""))
        elif b.get("type") == "image":
            images.append(anthropic_image(b, f"{where}.{j}"))
            texts.append(IMAGE_TAG)
    return "".join(texts), images or None


# Claude Code's first system block: a per-session attribution value ahead of everything else. It tells the model
# nothing, and left in it would make each new session's prompt differ from the first token on, so no session could
# reuse another's cached prefix (measured: 49 of ~31,800 tokens).
BILLING_HEADER = "x-anthropic-billing-header:"


def _without_billing(system: Any) -> Any:
    if not isinstance(system, list):
        return system
    return [
        b
        for b in system
        if not (isinstance(b, dict) and b.get("type") == "text" and str(b.get("text") or "").startswith(BILLING_HEADER))
    ]


def parse_messages(raw: Any, system: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: expected a non-empty array")
    out: list[ChatMessage] = []
    system = _without_billing(system)
    if system is not None:
        text, images = _plain(system, "system")
        if images:
            raise BadRequest("system: images are not supported in the system prompt; send them in a user message")
        out.append(ChatMessage("system", text))
    names: dict[str, str] = {}  # tool_use id → tool name, so results can name their tool
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f'{where}.role: expected "user" or "assistant"')
        texts, thinking, calls, images = [], [], [], []
        for j, b in enumerate(_blocks(m.get("content"), f"{where}.content")):
            kind = b.get("type")
            if kind == "text":
                texts.append(str(b.get("text") or ""))
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(b.get("thinking") or ""))
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise BadRequest(f"{where}.content.{j}: tool_use needs a name and an input object")
                call_id = b.get("id") or new_id("toolu_")
                names[call_id] = b["name"]
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": b["name"], "arguments": b.get("input") or {}},
                    }
                )
            elif kind == "tool_result" and role == "user":
                call_id = b.get("tool_use_id")
                result, result_images = _plain(b.get("content"), f"{where}.content.{j}.content")
                out.append(
                    ChatMessage(
                        "tool",
                        result,
                        tool_call_id=call_id,
                        tool_name=names.get(call_id or ""),
                        images=result_images,
                    )
                )
            elif kind == "image" and role == "user":
                # A url source is handed on: the engine fetches only hosts in server.fetch_image_urls.
                images.append(anthropic_image(b, f"{where}.content.{j}"))
                texts.append(IMAGE_TAG)
            elif kind == "document":
                raise BadRequest(f"{where}.content.{j}: document blocks are not supported")
            else:
                raise BadRequest(f"{where}.content.{j}: unsupported content block type {kind!r}")
        if texts or calls or thinking or role == "assistant":
            out.append(
                ChatMessage(
                    role,
                    "".join(texts),
                    thinking="".join(thinking) or None,
                    tool_calls=calls or None,
                    images=images or None,
                )
            )
    return out


def _tools(body: dict[str, Any]) -> tuple[Optional[list[dict[str, Any]]], Optional[ToolChoice]]:
    raw = body.get("tools")
    tools: Optional[list[dict[str, Any]]] = None
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in raw):
            raise BadRequest("tools: expected an array of {name, description, input_schema}")
        # Server tools (web search, …) have a "type" other than custom and no schema: we cannot run them.
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {"type": "object"},
                },
            }
            for t in raw
            if t.get("type") in (None, "custom")
        ] or None
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in (None, "auto"):
        return tools, None
    if kind == "none":
        return None, None
    if not tools:
        raise BadRequest("tool_choice requires tools")
    if kind == "any":
        return tools, ToolChoice()
    if kind == "tool" and isinstance(choice.get("name"), str):
        if choice["name"] not in {t["function"]["name"] for t in tools}:
            raise BadRequest(f"tool_choice names a tool that is not in tools: {choice['name']!r}")
        return tools, ToolChoice(choice["name"])
    raise BadRequest("tool_choice: type must be auto, any, tool or none")


def _request(incoming: Incoming, body: CountTokensBody, fields: dict[str, Any]) -> GenerateRequest:
    resolved = resolve_sampling(incoming.model_options, fields, ANTHROPIC_DEFAULTS)
    thinking = body.thinking
    req = GenerateRequest(
        model=incoming.name,
        messages=parse_messages(body.messages, body.system),
        sampling=resolved.sampling,
        max_tokens=resolved.max_tokens,
        num_ctx=resolved.num_ctx,
        num_draft=resolved.num_draft,
        stop=resolved.stop,
        think=thinking.get("type") in ("enabled", "adaptive") if isinstance(thinking, dict) else None,
        truncate=False,  # the real API answers an over-long prompt with a 400, which lets Claude Code compact
        priority=incoming.priority,
        timeout=incoming.timeout,
        created=incoming.arrival,
    )
    req.tools, req.force_tool = _tools(incoming.body)
    req.format = _output_format(incoming.body)
    return req


def build_message(incoming: Incoming) -> Call:
    body = validated(MessagesBody, incoming.body, "anthropic")
    req = _request(incoming, body, body.sampling_fields())
    headers = incoming.tools_note(req.tools) if req.force_tool is None else {}
    return Call(req, stream=body.stream, headers=headers)


def build_count(incoming: Incoming) -> Call:
    """Tokenized exactly as /v1/messages would be; the engine counts without loading the model."""
    req = _request(incoming, validated(CountTokensBody, incoming.body, "anthropic"), {})
    return Call(CountTokensRequest(req, priority=req.priority, timeout=req.timeout, created=req.created), stream=False)


def _output_format(body: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Structured outputs: `output_config.format` (or the older top-level `output_format`) with a JSON schema."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else body.get("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequest("output_config.format: expected {type: json_schema, schema: {...}}")
    return fmt["schema"]


__all__ = ["build_count", "build_message", "parse_messages"]
