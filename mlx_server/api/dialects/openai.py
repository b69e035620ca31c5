"""The OpenAI dialect: /v1/models, /v1/chat/completions and /v1/completions, translated to and from the engine.

Nothing here generates. Sampling is request field > models.yaml option > OpenAI's default (temperature 1, top_p 1,
no penalties; /v1/completions 16 tokens), see api/sampling.py. Streams are SSE ending in `data: [DONE]`; an error
after the first chunk is one more `data: {"error": …}` event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_server.api.dialects.bodies import ChatCompletionBody, CompletionBody, OpenAIBody, validated
from mlx_server.api.context import AppContext, Collected, ctx_of
from mlx_server.api.dialects.compat import arguments_object, json_dumps, new_id
from mlx_server.api.dialects.base import Call, Generation, Incoming, named_model
from mlx_server.api.dialects.sampling import OPENAI_COMPLETIONS_DEFAULTS, OPENAI_DEFAULTS, resolve_sampling
from mlx_server.contract.errors import BadRequest, MlxServerError, ModelNotFound
from mlx_server.contract.events import Delta, Done, Event, Failed, TokenLogprob, Usage
from mlx_server.contract.requests import ChatMessage, GenerateRequest, ToolChoice

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


@dataclass
class Reply:
    """How to shape the response for one request."""

    requested: str
    chat: bool
    stream: bool
    include_usage: bool
    echo: str = ""
    legacy_logprobs: bool = False  # /v1/completions' {"tokens", "token_logprobs", …} shape


# ---- request translation ------------------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            texts.append(str(part.get("text") or ""))
        elif kind in ("image_url", "input_image", "input_audio", "file"):
            raise BadRequest("this model does not support images, audio or files")
        else:
            raise BadRequest(f"{where}: unsupported content part type {kind!r}")
    return "".join(texts)


def parse_messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("invalid value for field \"messages\": expected a non-empty array")
    names: dict[str, str] = {}  # tool_call_id → function name, so tool results can name their tool
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise BadRequest(f"{where}.role must be one of system, developer, user, assistant, tool")
        content = _text(m.get("content"), f"{where}.content")
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
            out.append(ChatMessage("assistant", content, thinking=thinking if isinstance(thinking, str) else None,
                                   tool_calls=calls or None))
        elif role in ("tool", "function"):
            call_id = m.get("tool_call_id")
            out.append(ChatMessage("tool", content, tool_call_id=call_id,
                                   tool_name=names.get(call_id or "") or m.get("name")))
        else:
            out.append(ChatMessage("system" if role == "developer" else role, content))
    return out


def _tools(body: dict[str, Any]) -> tuple[Optional[list[dict[str, Any]]], Optional[ToolChoice]]:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise BadRequest("invalid value for field \"tools\": expected an array of {type: function, function}")
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return tools or None, None
    if choice == "none":
        return None, None  # the model is not told about tools at all, so it cannot call one
    if choice == "required":
        forced = ToolChoice()
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        forced = ToolChoice(choice["function"]["name"])
    else:
        raise BadRequest("invalid value for field \"tool_choice\": expected none, auto, required or a function")
    if not tools:
        raise BadRequest("tool_choice requires tools")
    if forced.name is not None and forced.name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names a function that is not in tools: {forced.name!r}")
    return tools, forced


def _response_format(body: dict[str, Any]) -> Any:
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise BadRequest("invalid value for field \"response_format\": type must be text, json_object or json_schema")


def _base(incoming: Incoming, body: OpenAIBody, max_tokens: Optional[int], chat: bool) -> GenerateRequest:
    if body.n is not None and body.n > 1:
        raise BadRequest("n > 1 is not supported; send separate requests")
    resolved = resolve_sampling(incoming.model_options, {**body.sampling_fields(), "num_predict": max_tokens},
                                OPENAI_DEFAULTS if chat else OPENAI_COMPLETIONS_DEFAULTS)
    return GenerateRequest(
        model=incoming.name, sampling=resolved.sampling, max_tokens=resolved.max_tokens, num_ctx=resolved.num_ctx,
        stop=resolved.stop, format=_response_format(incoming.body), priority=incoming.priority,
        timeout=incoming.timeout, created=incoming.arrival)


def _reply(incoming: Incoming, body: OpenAIBody, chat: bool, echo: str = "") -> Reply:
    options = body.stream_options
    return Reply(requested=incoming.requested, chat=chat, stream=body.stream, echo=echo, legacy_logprobs=not chat,
                 include_usage=body.stream and isinstance(options, dict) and options.get("include_usage") is True)


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
        raise BadRequest("invalid value for field \"prompt\": expected a string (batched and token prompts "
                         "are not supported)")
    req.prompt = prompt
    if body.suffix:
        req.suffix = str(body.suffix)
    req.logprobs, req.top_logprobs = body.logprobs is not None, body.logprobs or 0
    reply = _reply(incoming, body, chat=False, echo=prompt if body.echo else "")
    return Call(req, stream=body.stream, shape=reply)


# ---- response translation -----------------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def tool_calls_json(calls: Any, start: int = 0, stream: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        fn = call["function"]
        item = {"id": call.get("id") or new_id("call_"), "type": "function",
                "function": {"name": fn["name"], "arguments": json_dumps(fn.get("arguments") or {})}}
        out.append({"index": start + i, **item} if stream else item)
    return out


def _lp(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def logprobs_json(lps: tuple[TokenLogprob, ...] | list[TokenLogprob], legacy: bool,
                  offset: int = 0) -> Optional[dict[str, Any]]:
    if not lps:
        return None
    if legacy:
        offsets, pos = [], offset
        for lp in lps:
            offsets.append(pos)
            pos += len(lp.token)
        return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}
    return {"content": [{**_lp(lp.token, lp.logprob), "top_logprobs": [_lp(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


def _envelope(cid: str, reply: Reply, created: int, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if reply.chat else "text_completion"
    return {"id": cid, "object": kind, "created": created, "model": reply.requested,
            "system_fingerprint": "fp_mlx_server"}


def chunk_json(cid: str, reply: Reply, created: int, delta: Optional[Delta], tool_index: int,
               finish: Optional[str] = None, offset: int = 0) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    lps = logprobs_json(delta.logprobs, reply.legacy_logprobs, offset) if delta else None
    if reply.chat:
        d: dict[str, Any] = {}
        if delta and delta.thinking:
            d["reasoning_content"] = delta.thinking
        if delta and delta.content:
            d["content"] = delta.content
        if delta and delta.tool_calls:
            d["tool_calls"] = tool_calls_json(delta.tool_calls, tool_index, stream=True)
        choice["delta"] = d
    else:
        choice["text"] = delta.content if delta else ""
    choice.update({"logprobs": lps, "finish_reason": finish})
    out = {**_envelope(cid, reply, created, chunk=True), "choices": [choice]}
    if reply.include_usage:
        out["usage"] = None
    return out


async def encode(incoming: Incoming, call: Call, events: AsyncIterator[Event]) -> AsyncIterator[Any]:
    reply: Reply = call.shape
    cid, created = new_id("chatcmpl-" if reply.chat else "cmpl-"), int(time.time())
    tool_index, offset = 0, len(reply.echo)
    if reply.chat:
        opening = chunk_json(cid, reply, created, None, 0)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield {"data": json_dumps(opening)}
    elif reply.echo:
        yield {"data": json_dumps(chunk_json(cid, reply, created, Delta(0, content=reply.echo), 0))}
    async for event in events:
        if isinstance(event, Delta):
            if event.content or event.thinking or event.tool_calls or event.logprobs:
                yield {"data": json_dumps(chunk_json(cid, reply, created, event, tool_index, offset=offset))}
            tool_index += len(event.tool_calls)
            offset += len(event.content)
        elif isinstance(event, Done):
            finish = FINISH.get(event.reason, "stop")
            yield {"data": json_dumps(chunk_json(cid, reply, created, None, tool_index, finish))}
            if reply.include_usage:
                yield {"data": json_dumps({**_envelope(cid, reply, created, chunk=True), "choices": [],
                                           "usage": usage_json(event.usage)})}
            yield {"data": "[DONE]"}
        elif isinstance(event, Failed):
            yield error_frame(event.error)


def final(incoming: Incoming, call: Call, result: Collected) -> dict[str, Any]:
    reply: Reply = call.shape
    assert result.done is not None
    lps = result.logprobs
    out = {**_envelope(new_id("chatcmpl-" if reply.chat else "cmpl-"), reply, int(time.time()), chunk=False),
           "usage": usage_json(result.usage)}
    finish = FINISH.get(result.done.reason, "stop")
    if reply.chat:
        message: dict[str, Any] = {"role": "assistant", "content": result.content or None, "refusal": None}
        if result.thinking:
            message["reasoning_content"] = result.thinking
        if result.tool_calls:
            message["tool_calls"] = tool_calls_json(result.tool_calls)
        out["choices"] = [{"index": 0, "message": message, "logprobs": logprobs_json(lps, False),
                           "finish_reason": finish}]
    else:
        out["choices"] = [{"index": 0, "text": reply.echo + result.content,
                           "logprobs": logprobs_json(lps, True, len(reply.echo)), "finish_reason": finish}]
    return out


# ---- errors and streams ------------------------------------------------------------------------------------------

# HTTP statuses Starlette itself raises (unknown route, wrong method) → OpenAI's error types.
_HTTP_TYPES = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def error_body(exc: MlxServerError) -> dict[str, Any]:
    code = "model_not_found" if isinstance(exc, ModelNotFound) else None
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": None, "code": code}}


def http_error_body(status: int, detail: str) -> dict[str, Any]:
    kind = _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": detail, "type": kind, "param": None, "code": None}}


def error_frame(exc: MlxServerError) -> bytes:
    # The openai SDK raises on a `data:` event whose object has "error"
    return ServerSentEvent(data=json_dumps(error_body(exc))).encode()


def stream_response(frames: AsyncIterator[Any]) -> Response:
    return EventSourceResponse(frames)


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


__all__ = ["CHAT", "COMPLETION", "error_body", "error_frame", "get_model", "http_error_body", "list_models",
           "stream_response"]
