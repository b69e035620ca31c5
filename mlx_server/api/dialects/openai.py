"""The OpenAI dialect: /v1/models, /v1/chat/completions and /v1/completions, translated to and from the engine.

Nothing here generates. Sampling is request field > models.yaml option > OpenAI's default (temperature 1, top_p 1,
no penalties; /v1/completions 16 tokens), see api/dialects/sampling.py. The replies (JSON, SSE chunks, error bodies) are
shaped in openai_reply.py; the route table reaches its error functions through this module.
"""

from __future__ import annotations

from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_server.api.context import AppContext, ctx_of
from mlx_server.api.dialects.base import Call, Generation, Incoming, named_model
from mlx_server.api.dialects.bodies import ChatCompletionBody, CompletionBody, OpenAIBody, validated
from mlx_server.api.dialects.compat import arguments_object, effort_level, new_id
from mlx_server.api.dialects.images import IMAGE_TAG, openai_image
from mlx_server.api.dialects.openai_reply import (
    Reply,
    encode,
    error_body,
    error_frame,
    final,
    http_error_body,
    stream_response,
)
from mlx_server.api.dialects.sampling import OPENAI_COMPLETIONS_DEFAULTS, OPENAI_DEFAULTS, resolve_sampling
from mlx_server.contract.errors import BadRequest, ModelNotFound
from mlx_server.contract.requests import ChatMessage, GenerateRequest, ToolChoice

# ---- request translation ------------------------------------------------------------------------------------


# Text parts of chat messages and of Responses items (whose assistant turns carry output_text, reasoning items
# summary_text / reasoning_text); a refusal part is the text the model said.
TEXT_PARTS = ("text", "input_text", "output_text", "summary_text", "reasoning_text")


def content_text(content: Any, where: str) -> tuple[str, Optional[list[str]]]:
    """A message's text and images: text parts joined as they come, each image part an [img] tag at its place."""
    if content is None:
        return "", None
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            texts.append(str(part.get("text") or ""))
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        elif kind in ("image_url", "input_image"):
            # URLs are handed on: the engine fetches only hosts in server.fetch_image_urls and refuses the rest.
            images.append(openai_image(part, f"{where}[{j}]"))
            texts.append(IMAGE_TAG)
        elif kind in ("input_audio", "file", "input_file"):
            raise BadRequest(f"{where}[{j}]: {kind} content parts are not supported")
        else:
            raise BadRequest(f"{where}: unsupported content part type {kind!r}")
    return "".join(texts), images or None


def parse_messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest('invalid value for field "messages": expected a non-empty array')
    names: dict[str, str] = {}  # tool_call_id → function name, so tool results can name their tool
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise BadRequest(f"{where}.role must be one of system, developer, user, assistant, tool")
        content, images = content_text(m.get("content"), f"{where}.content")
        if role == "assistant":
            calls = []
            for j, c in enumerate(m.get("tool_calls") or []):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest(f"{where}.tool_calls[{j}] must have a function with a name")
                call_id = c.get("id") or new_id("call_")
                names[call_id] = fn["name"]
                args = arguments_object(fn.get("arguments"), f"{where}.tool_calls[{j}]")
                calls.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}})
            thinking = m.get("reasoning_content") or m.get("reasoning")
            out.append(
                ChatMessage(
                    "assistant",
                    content,
                    thinking=thinking if isinstance(thinking, str) else None,
                    tool_calls=calls or None,
                    images=images,
                )
            )
        elif role in ("tool", "function"):
            call_id = m.get("tool_call_id")
            out.append(
                ChatMessage(
                    "tool",
                    content,
                    tool_call_id=call_id,
                    tool_name=names.get(call_id or "") or m.get("name"),
                    images=images,
                )
            )
        else:
            out.append(ChatMessage("system" if role == "developer" else role, content, images=images))
    return out


def _tools(body: dict[str, Any]) -> tuple[Optional[list[dict[str, Any]]], Optional[ToolChoice]]:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools
        ):
            raise BadRequest('invalid value for field "tools": expected an array of {type: function, function}')
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return tools or None, None
    if choice == "none":
        return None, None  # the model is not told about tools at all, so it cannot call one
    named = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    return tools, forced_choice(choice, named, tools)


def forced_choice(choice: Any, named: Any, tools: Optional[list[dict[str, Any]]]) -> ToolChoice:
    """`required`, or the function `named`, checked against the tools (chat and Responses name it differently)."""
    if choice == "required":
        forced = ToolChoice()
    elif isinstance(named, str):
        forced = ToolChoice(named)
    else:
        raise BadRequest('invalid value for field "tool_choice": expected none, auto, required or a function')
    if not tools:
        raise BadRequest("tool_choice requires tools")
    if forced.name is not None and forced.name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names a function that is not in tools: {forced.name!r}")
    return forced


def output_format(spec: Any, schema: Any, field: str, schema_field: str) -> Any:
    """A structured-output setting (`{type: text | json_object | json_schema}`) as the request's format."""
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        if not isinstance(schema, dict):
            raise BadRequest(f"{schema_field} must be a JSON schema object")
        return schema
    raise BadRequest(f'invalid value for field "{field}": type must be text, json_object or json_schema')


def _response_format(body: dict[str, Any]) -> Any:
    rf = body.get("response_format")
    spec = rf.get("json_schema") if isinstance(rf, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return output_format(rf, schema, "response_format", "response_format.json_schema.schema")


def _base(incoming: Incoming, body: OpenAIBody, max_tokens: Optional[int], chat: bool) -> GenerateRequest:
    if body.n is not None and body.n > 1:
        raise BadRequest("n > 1 is not supported; send separate requests")
    resolved = resolve_sampling(
        incoming.model_options,
        {**body.sampling_fields(), "num_predict": max_tokens},
        OPENAI_DEFAULTS if chat else OPENAI_COMPLETIONS_DEFAULTS,
    )
    return GenerateRequest(
        model=incoming.name,
        sampling=resolved.sampling,
        max_tokens=resolved.max_tokens,
        num_ctx=resolved.num_ctx,
        num_draft=resolved.num_draft,
        stop=resolved.stop,
        truncate=False,  # OpenAI refuses an over-long prompt (context_length_exceeded) rather than cutting it
        format=_response_format(incoming.body),
        cache_key=body.prompt_cache_key,
        priority=incoming.priority,
        timeout=incoming.timeout,
        created=incoming.arrival,
    )


def _reply(incoming: Incoming, body: OpenAIBody, chat: bool, echo: str = "") -> Reply:
    options = body.stream_options
    return Reply(
        requested=incoming.requested,
        chat=chat,
        stream=body.stream,
        echo=echo,
        legacy_logprobs=not chat,
        include_usage=body.stream and isinstance(options, dict) and options.get("include_usage") is True,
    )


def build_chat(incoming: Incoming) -> Call:
    body = validated(ChatCompletionBody, incoming.body, "openai")
    req = _base(incoming, body, body.max_completion_tokens or body.max_tokens, chat=True)
    req.messages = parse_messages(body.messages)
    req.tools, req.force_tool = _tools(incoming.body)
    req.logprobs, req.top_logprobs = body.logprobs, body.top_logprobs
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true")
    reasoning = body.reasoning if isinstance(body.reasoning, dict) else {}
    effort = body.reasoning_effort or reasoning.get("effort")
    if isinstance(effort, str):
        req.think = effort != "none"
        req.think_level = effort_level(effort)
    elif isinstance(body.think, bool):
        req.think = body.think
    headers = incoming.tools_note(req.tools) if req.force_tool is None else {}
    return Call(req, stream=body.stream, shape=_reply(incoming, body, chat=True), headers=headers)


def build_completion(incoming: Incoming) -> Call:
    body = validated(CompletionBody, incoming.body, "openai")
    req = _base(incoming, body, body.max_tokens, chat=False)
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest(
            'invalid value for field "prompt": expected a string (batched and token prompts are not supported)'
        )
    req.prompt = prompt
    if body.suffix:
        req.suffix = str(body.suffix)
    req.logprobs, req.top_logprobs = body.logprobs is not None, body.logprobs or 0
    reply = _reply(incoming, body, chat=False, echo=prompt if body.echo else "")
    return Call(req, stream=body.stream, shape=reply)


target = named_model("you must provide a model parameter")
CHAT = Generation(target, build_chat, encode, final, verb="chat")
COMPLETION = Generation(target, build_completion, encode, final)


# ---- models ---------------------------------------------------------------------------------------------------


async def _model_entries(ctx: AppContext) -> list[dict[str, Any]]:
    entries = []
    for name, known in (await ctx.catalog.entries()).items():
        if not known.located.present:
            continue
        model, info = ctx.config.models[name], known.info
        created = int(info.modified.timestamp()) if info is not None else int(ctx.started)
        for label in (name, *model.aliases):
            entries.append({"id": label, "object": "model", "created": created, "owned_by": "library"})
    return entries


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": await _model_entries(ctx_of(request))})


async def get_model(request: Request) -> Response:
    ctx = ctx_of(request)
    wanted = request.path_params["model"]
    for entry in await _model_entries(ctx):
        if entry["id"] == wanted:
            return JSONResponse(entry)
    raise ModelNotFound(wanted)


__all__ = [
    "CHAT",
    "COMPLETION",
    "error_body",
    "error_frame",
    "get_model",
    "http_error_body",
    "list_models",
    "stream_response",
]
