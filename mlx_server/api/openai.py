"""The OpenAI dialect: /v1/models, /v1/chat/completions and /v1/completions, translated to and from the engine.

Nothing here generates. Defaults are OpenAI's (temperature 1, top_p 1, no penalties); per-model options from
models.yaml only fill in what OpenAI has no field for (top_k, min_p, repeat_penalty, num_ctx). Streams are SSE
ending in `data: [DONE]`; an error after the first chunk is one more `data: {"error": …}` event.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_server.api.common import AppContext, begin, collect, ctx_of, follow, note_model, read_json, request_log
from mlx_server.api.compat import (arguments_object, boolean, integer, json_dumps, new_id, number,
                                   stop_list)
from mlx_server.api.errors_shape import openai_error
from mlx_server.errors import BadRequest, ModelNotFound
from mlx_server.types import (ChatMessage, Delta, Done, Event, Failed, GenerateRequest, Priority, SamplingParams,
                              TokenLogprob, ToolChoice, Usage)

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
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise BadRequest("invalid value for field \"response_format\": type must be text, json_object or json_schema")


def _sampling(body: dict[str, Any], options: dict[str, Any]) -> SamplingParams:
    def opt(key: str, default: float) -> float:
        value = options.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    return SamplingParams(
        temperature=number(body, "temperature", 0, 2, 1.0) or 0.0,
        top_p=number(body, "top_p", 0, 1, 1.0) or 0.0,
        top_k=integer(body, "top_k", 0, None, int(opt("top_k", 0))) or 0,
        min_p=number(body, "min_p", 0, 1, opt("min_p", 0.0)) or 0.0,
        repeat_penalty=number(body, "repeat_penalty", 0.01, 10, opt("repeat_penalty", 1.0)) or 1.0,
        presence_penalty=number(body, "presence_penalty", -2, 2, 0.0) or 0.0,
        frequency_penalty=number(body, "frequency_penalty", -2, 2, 0.0) or 0.0,
        seed=integer(body, "seed"))


def build_request(ctx: AppContext, body: dict[str, Any], request: Request, name: str, chat: bool) -> GenerateRequest:
    n = integer(body, "n", 1)
    if n is not None and n > 1:
        raise BadRequest("n > 1 is not supported; send separate requests")
    options = dict(ctx.config.models[name].options)
    max_tokens = integer(body, "max_completion_tokens", 1) or integer(body, "max_tokens", 1)
    if max_tokens is None and not chat:
        max_tokens = 16  # OpenAI's documented default for /v1/completions
    req = GenerateRequest(
        model=name, sampling=_sampling(body, options), max_tokens=max_tokens,
        num_ctx=options.get("num_ctx") if isinstance(options.get("num_ctx"), int) else None,
        stop=stop_list(body, "stop"), format=_response_format(body),
        priority=Priority.parse(request.headers.get("x-request-priority")),
        timeout=ctx.config.server.request_timeout)
    if chat:
        req.messages = parse_messages(body.get("messages"))
        req.tools, req.force_tool = _tools(body)
        req.logprobs = boolean(body, "logprobs")
        req.top_logprobs = integer(body, "top_logprobs", 0, 20) or 0
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs requires logprobs to be true")
        effort = body.get("reasoning_effort") or (body.get("reasoning") or {}).get("effort")
        if isinstance(effort, str):
            req.think = effort != "none"
        elif isinstance(body.get("think"), bool):
            req.think = body["think"]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("invalid value for field \"prompt\": expected a string (batched and token prompts "
                             "are not supported)")
        req.prompt = prompt
        if body.get("suffix"):
            req.suffix = str(body["suffix"])
        top = integer(body, "logprobs", 0, 5)
        req.logprobs, req.top_logprobs = top is not None, top or 0
    return req


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


async def sse(events: AsyncIterator[Event], first: Event, reply: Reply, started_at: float
              ) -> AsyncIterator[dict[str, Any]]:
    cid, created = new_id("chatcmpl-" if reply.chat else "cmpl-"), int(time.time())
    tool_index, offset = 0, len(reply.echo)
    if reply.chat:
        opening = chunk_json(cid, reply, created, None, 0)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield {"data": json_dumps(opening)}
    elif reply.echo:
        yield {"data": json_dumps(chunk_json(cid, reply, created, Delta(0, content=reply.echo), 0))}
    async with contextlib.aclosing(follow(events, first, "openai", reply.requested, started_at)) as stream:
        async for event in stream:
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
                yield {"data": json_dumps(openai_error(event.error))}


async def _serve(request: Request, chat: bool) -> Response:
    started_at = time.perf_counter()
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise BadRequest("you must provide a model parameter")
    name = ctx.resolve(requested)
    note_model(request, name)
    req = build_request(ctx, body, request, name, chat)
    stream = boolean(body, "stream")
    options = body.get("stream_options") or {}
    reply = Reply(requested=requested, chat=chat, stream=stream,
                  include_usage=stream and isinstance(options, dict) and options.get("include_usage") is True,
                  echo=req.prompt if (not chat and boolean(body, "echo") and req.prompt) else "",
                  legacy_logprobs=not chat)
    events, first = await begin(request, req)
    if stream:
        return EventSourceResponse(sse(events, first, reply, started_at))
    result = await collect(events, request, first)
    request_log("openai", requested, "ok", result.usage, started_at)
    assert result.done is not None
    lps = result.logprobs
    out = {**_envelope(new_id("chatcmpl-" if chat else "cmpl-"), reply, int(time.time()), chunk=False),
           "usage": usage_json(result.usage)}
    finish = FINISH.get(result.done.reason, "stop")
    if chat:
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
    return JSONResponse(out)


async def chat_completions(request: Request) -> Response:
    return await _serve(request, chat=True)


async def completions(request: Request) -> Response:
    return await _serve(request, chat=False)


# ---- models ---------------------------------------------------------------------------------------------------


def _model_entries(ctx: AppContext) -> list[dict[str, Any]]:
    entries = []
    for name, model in ctx.config.models.items():
        if not ctx.locate(name).present:
            continue
        info = ctx.info(name)
        created = int(info.modified.timestamp()) if info is not None else int(ctx.started)
        for label in (name, *model.aliases):
            entries.append({"id": label, "object": "model", "created": created, "owned_by": "library"})
    return entries


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _model_entries(ctx_of(request))})


async def get_model(request: Request) -> Response:
    ctx = ctx_of(request)
    wanted = request.path_params["model"]
    for entry in _model_entries(ctx):
        if entry["id"] == wanted:
            return JSONResponse(entry)
    raise ModelNotFound(wanted)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]

__all__ = ["routes"]
