"""The Ollama dialect: translate /api/* requests to GenerateRequest and engine events back to Ollama JSON.

Nothing here generates; see ../shared/ollama-compat.md for the conventions clients depend on (NDJSON, errors
as `{"error"}`, nanosecond durations, RFC 3339 times).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mlx_server.api.common import (AppContext, begin, close_events, collect, ctx_of, error_body, field_type,
                                   follow, note_model, ns, read_json, request_log, rfc3339)
from mlx_server.api.options import ollama_sampling
from mlx_server.api.templates import render_go_template
from mlx_server.config import parse_duration
from mlx_server.errors import BadRequest, MlxServerError, NotSupported
from mlx_server.types import ChatMessage, Delta, Done, Event, Failed, GenerateRequest, Priority, Started, Usage

log = logging.getLogger("mlx_server.api.ollama")

OLLAMA_VERSION = "0.12.10"
FAR_FUTURE = "2318-08-30T00:00:00Z"  # what Ollama reports for keep_alive < 0


# ---- request translation ------------------------------------------------------------------------------------


def parse_keep_alive(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"invalid keep_alive: {exc}") from None


def parse_messages(raw: Any) -> list[ChatMessage]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("invalid value for field \"messages\": expected an array")
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string \"role\"")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise BadRequest(f"messages[{i}].tool_calls must be an array")
        images = m.get("images")
        if images:
            raise BadRequest("this model does not support images")
        out.append(ChatMessage(role=m["role"], content=content, thinking=m.get("thinking"),
                               tool_calls=calls, tool_name=m.get("tool_name") or m.get("name")))
    return out


def resolve_target(ctx: AppContext, body: dict[str, Any]) -> tuple[str, str]:
    """(name to echo, configured model). An explicit model must exist; without one, the MLX-style `category`
    resolves through the aliases, and an unknown category goes to server.default_model."""
    requested = field_type(body, "model", str, "a string")
    if requested:
        return requested, ctx.resolve(requested)
    category = field_type(body, "category", str, "a string")
    default = ctx.config.server.default_model
    if category is None and default is None:
        raise BadRequest("model is required")
    target = (ctx.config.resolve(category) if category else None) or default
    if target is None:
        raise BadRequest(f"category \"{category}\" matches no model and server.default_model is not set")
    name = ctx.resolve(target)
    return name, name


def apply_top_level_options(body: dict[str, Any]) -> None:
    """MLX-style clients put max_tokens / temperature / top_p at the top level; `options` wins when it sets them."""
    top = {k: body[k] for k in ("max_tokens", "temperature", "top_p") if body.get(k) is not None}
    if not top:
        return
    options = body.get("options")
    if options is None:
        options = body["options"] = {}
    if not isinstance(options, dict):
        return  # ollama_sampling reports the bad type
    if "max_tokens" in top:
        options.setdefault("num_predict", top.pop("max_tokens"))
    for key, value in top.items():
        options.setdefault(key, value)


def base_request(ctx: AppContext, body: dict[str, Any], request: Request, name: str) -> GenerateRequest:
    model_options = ctx.config.models[name].options
    sampling, max_tokens, num_ctx, stop = ollama_sampling(body.get("options"), model_options)
    fmt = body.get("format")
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise BadRequest("invalid value for field \"format\": expected \"json\" or a JSON schema object")
    think = body.get("think")
    if isinstance(think, str):
        if think not in ("low", "medium", "high"):
            raise BadRequest("invalid value for field \"think\": expected a boolean or low/medium/high")
        think = True
    elif think is not None and not isinstance(think, bool):
        raise BadRequest("invalid value for field \"think\": expected a boolean or low/medium/high")
    tools = field_type(body, "tools", list, "an array of tool definitions")
    return GenerateRequest(
        model=name, sampling=sampling, max_tokens=max_tokens, num_ctx=num_ctx, stop=stop,
        keep_alive=parse_keep_alive(body.get("keep_alive")), format=fmt or None, think=think, tools=tools,
        priority=Priority.parse(request.headers.get("x-request-priority")),
        timeout=ctx.config.server.request_timeout)


def generate_request(ctx: AppContext, body: dict[str, Any], request: Request, name: str) -> GenerateRequest:
    req = base_request(ctx, body, request, name)
    prompt = field_type(body, "prompt", str, "a string")
    system = field_type(body, "system", str, "a string")
    template = field_type(body, "template", str, "a string")
    raw = bool(field_type(body, "raw", bool, "a boolean"))
    if body.get("images"):
        raise BadRequest("this model does not support images")
    req.suffix = field_type(body, "suffix", str, "a string") or None
    if prompt:
        if template and not raw:
            prompt, raw = render_go_template(template, prompt=prompt, system=system or ""), True
        req.prompt, req.raw, req.system = prompt, raw, (None if raw else system)
    return req


def chat_request(ctx: AppContext, body: dict[str, Any], request: Request, name: str) -> GenerateRequest:
    req = base_request(ctx, body, request, name)
    req.messages = parse_messages(body.get("messages")) or None
    return req


# ---- response translation -----------------------------------------------------------------------------------


def final_fields(reason: str, usage: Usage) -> dict[str, Any]:
    # Ollama reports a reply that made tool calls as a plain "stop".
    return {"done": True, "done_reason": "stop" if reason == "tool_calls" else reason,
            "total_duration": ns(usage.total_duration),
            "load_duration": ns(usage.load_duration), "prompt_eval_count": usage.evaluated_prompt_tokens,
            "prompt_eval_duration": ns(usage.prompt_eval_duration), "eval_count": usage.completion_tokens,
            "eval_duration": ns(usage.eval_duration)}


def chunk(chat: bool, model: str, delta: Optional[Delta]) -> dict[str, Any]:
    base: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    content = delta.content if delta else ""
    thinking = delta.thinking if delta else ""
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if delta and delta.tool_calls:
            message["tool_calls"] = list(delta.tool_calls)
        base["message"] = message
    else:
        base["response"] = content
        base["text"] = content  # MLX-style clients read `text`; Ollama clients read `response`
        if thinking:
            base["thinking"] = thinking
    base["done"] = False
    return base


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


async def ndjson(events: AsyncIterator[Event], first: Event, chat: bool, model: str,
                 started_at: float) -> AsyncIterator[bytes]:
    """Stream one NDJSON line per delta; an error after the start is one more line with `error`."""
    async with contextlib.aclosing(follow(events, first, "ollama", model, started_at)) as stream:
        async for event in stream:
            if isinstance(event, Delta):
                yield line(chunk(chat, model, event))
            elif isinstance(event, Done):
                yield line({**chunk(chat, model, None), **final_fields(event.reason, event.usage)})
            elif isinstance(event, Failed):
                yield line(error_body(event.error))


async def _serve(request: Request, chat: bool) -> Response:
    started_at = time.perf_counter()
    ctx = ctx_of(request)
    body = await read_json(request)
    requested, name = resolve_target(ctx, body)
    note_model(request, name)
    apply_top_level_options(body)
    req = (chat_request if chat else generate_request)(ctx, body, request, name)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("invalid value for field \"stream\": expected a boolean")
    events, first = await begin(request, req)
    if isinstance(first, Done) and first.reason in ("load", "unload"):
        await close_events(events)
        return JSONResponse({**chunk(chat, requested, None), **final_fields(first.reason, first.usage)})
    if stream:
        return StreamingResponse(ndjson(events, first, chat, requested, started_at),
                                 media_type="application/x-ndjson")
    result = await collect(events, request, first)
    request_log("ollama", requested, "ok", result.usage, started_at)
    assert result.done is not None
    obj = chunk(chat, requested, Delta(0, content=result.content, thinking=result.thinking,
                                       tool_calls=tuple(result.tool_calls)))
    return JSONResponse({**obj, **final_fields(result.done.reason, result.usage)})


async def generate(request: Request) -> Response:
    return await _serve(request, chat=False)


async def chat(request: Request) -> Response:
    return await _serve(request, chat=True)


# ---- model listing ------------------------------------------------------------------------------------------


async def root(request: Request) -> Response:
    if "application/json" in request.headers.get("accept", "") and request.method == "GET":
        ctx = ctx_of(request)
        present = [name for name in ctx.config.models if ctx.locate(name).present]
        return JSONResponse({"status": "running", "available_models": present, "version": OLLAMA_VERSION})
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


def _entry(ctx: AppContext, name: str, label: str) -> Optional[dict[str, Any]]:
    found = ctx.locate(name)
    info = ctx.info(name)
    if not found.present or info is None:
        return None
    return {"name": label, "model": name, "modified_at": rfc3339(info.modified), "size": found.size,
            "digest": found.digest, "details": info.details(), "exists": True}


async def tags(request: Request) -> Response:
    ctx = ctx_of(request)
    models = [e for name in ctx.config.models if (e := _entry(ctx, name, name)) is not None]
    # Each alias is listed as its own entry (name = alias, model = target) for clients that pick by alias.
    models += [e for alias, name in ctx.config.aliases().items() if (e := _entry(ctx, name, alias)) is not None]
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = field_type(body, "model", str, "a string") or field_type(body, "name", str, "a string")
    if not requested:
        raise BadRequest("model is required")
    name = ctx.resolve(requested)
    info = ctx.info(name)
    if info is None:
        raise MlxServerError(f"cannot read model files for \"{name}\"")
    cfg = ctx.config.models[name]
    params = "\n".join(f"{k} {json.dumps(v) if isinstance(v, str) else v}" for k, v in cfg.options.items())
    model_info = {"general.architecture": info.family, "general.parameter_count": info.parameter_count,
                  **info.arch_info}
    ctx_len = cfg.context_length or info.context_length
    model_info[f"{info.family}.context_length"] = ctx_len
    return JSONResponse({
        "modelfile": f"# served by mlx-server\nFROM {cfg.source}\n", "parameters": params,
        "template": info.template, "details": info.details(), "model_info": model_info,
        "capabilities": info.capabilities, "modified_at": rfc3339(info.modified)})


async def ps(request: Request) -> Response:
    ctx = ctx_of(request)
    now_mono, now_wall = time.monotonic(), time.time()
    models = []
    for r in ctx.engine.pool.snapshot():
        if r.is_loading:
            continue
        entry = _entry(ctx, r.name, r.name) or {"name": r.name, "model": r.name, "digest": "", "details": {}}
        if r.expires_at is None:
            expires = FAR_FUTURE
        else:
            expires = rfc3339(dt.datetime.fromtimestamp(now_wall + (r.expires_at - now_mono), tz=dt.timezone.utc))
        models.append({"name": r.name, "model": r.name, "size": r.size, "size_vram": r.size,
                       "digest": entry["digest"], "details": entry["details"], "expires_at": expires,
                       "context_length": ctx.config.models[r.name].context_length})
    return JSONResponse({"models": models})


async def embed(request: Request) -> Response:
    """Known models, clear refusal: this server generates; embeddings go to the fallback Ollama, if any."""
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = field_type(body, "model", str, "a string")
    if not requested:
        raise BadRequest("model is required")
    name = ctx.resolve(requested)
    raise NotSupported(f"model \"{name}\" does not support embeddings on this server")


routes = [
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embed, methods=["POST"]),
    Route("/v1/embeddings", embed, methods=["POST"]),
    Route("/", root, methods=["GET", "HEAD"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/chat", chat, methods=["POST"]),
]


__all__ = ["routes", "Started"]
