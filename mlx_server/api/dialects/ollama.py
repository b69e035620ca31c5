"""The Ollama dialect: translate /api/* requests to GenerateRequest, and answer Ollama's model listings.

Nothing here generates. Clients (the official `ollama` Python client above all) depend on the conventions of
Ollama's API (https://github.com/ollama/ollama/blob/main/docs/api.md): streaming NDJSON with nothing but one JSON
object per line, errors as `{"error": "..."}`, integer nanosecond durations, RFC 3339 times. The replies are shaped
in ollama_reply.py; the route table and manage.py reach its functions through this module.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mlx_server.api.catalog import Entry
from mlx_server.api.context import AppContext, ctx_of, error_body, field_type, read_json, rfc3339
from mlx_server.api.dialects.base import Call, Generation, Incoming
from mlx_server.api.dialects.images import image_list
from mlx_server.api.dialects.ollama_reply import encoder, error_frame, final_for, http_error_body, line, stream_response
from mlx_server.api.dialects.options import OLLAMA_DEFAULTS
from mlx_server.api.dialects.sampling import resolve_sampling
from mlx_server.api.dialects.templates import render_go_template
from mlx_server.config.load import parse_duration
from mlx_server.config.tree import ModelConfig
from mlx_server.contract.errors import BadRequest, MlxServerError
from mlx_server.contract.requests import ChatMessage, EngineRequest, GenerateRequest, LoadRequest, UnloadRequest

log = logging.getLogger("mlx_server.api.dialects.ollama")

OLLAMA_VERSION = "0.13.4"
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
        raise BadRequest('invalid value for field "messages": expected an array')
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f'messages[{i}] must be an object with a string "role"')
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise BadRequest(f"messages[{i}].tool_calls must be an array")
        out.append(
            ChatMessage(
                role=m["role"],
                content=content,  # as sent: the user's own [img-N] tags are the engine's to place
                thinking=m.get("thinking"),
                tool_calls=calls,
                tool_name=m.get("tool_name") or m.get("name"),
                images=image_list(m.get("images"), f"messages[{i}].images"),
            )
        )
    return out


def attach_top_level_images(messages: list[ChatMessage], raw: Any) -> None:
    """`images` beside `messages` (real Ollama ignores them, but a client of ours sends them there) belong to the
    last user message, after the images it carries itself."""
    images = image_list(raw, "images")
    if not images or not messages:  # no messages: a load request, which Ollama answers whatever else is sent
        return
    last = next((m for m in reversed(messages) if m.role == "user"), None)
    if last is None:
        raise BadRequest('"images" beside "messages" go to the last user message, and there is none')
    last.images = [*(last.images or ()), *images]


async def resolve_target(ctx: AppContext, body: dict[str, Any]) -> tuple[str, str]:
    """(name to echo, configured model). An explicit model must exist; without one, the MLX-style `category`
    resolves through the aliases, and an unknown category goes to server.default_model."""
    requested = field_type(body, "model", str, "a string")
    if requested:
        return requested, await ctx.resolve(requested)
    category = field_type(body, "category", str, "a string")
    default = ctx.config.server.default_model
    if category is None and default is None:
        raise BadRequest("model is required")
    target = (ctx.config.resolve(category) if category else None) or default
    if target is None:
        raise BadRequest(f'category "{category}" matches no model and server.default_model is not set')
    name = await ctx.resolve(target)
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
        return  # base_request reports the bad type
    if "max_tokens" in top:
        options.setdefault("num_predict", top.pop("max_tokens"))
    for key, value in top.items():
        options.setdefault(key, value)


THINK_LEVELS = ("low", "medium", "high")


def _think(body: dict[str, Any]) -> tuple[Optional[bool], Optional[str]]:
    """(think, level): a level turns thinking on and is the model's reasoning effort where its template takes one."""
    think = body.get("think")
    if think == "max":  # newer Ollama's top level; effort templates (gpt-oss) know only up to high, as Ollama says
        return True, "high"
    if isinstance(think, str) and think in THINK_LEVELS:
        return True, think
    if think is not None and not isinstance(think, bool):
        raise BadRequest('invalid value for field "think": expected a boolean or "low", "medium", "high", "max"')
    return think, None


def _logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    """(logprobs, top_logprobs). Like Ollama, top_logprobs is checked whatever logprobs says, and without
    logprobs nothing is returned."""
    wanted = bool(field_type(body, "logprobs", bool, "a boolean"))
    top = field_type(body, "top_logprobs", int, "an integer from 0 to 20")
    if top is not None and not 0 <= top <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")  # Ollama's words
    return wanted, top or 0


def _stream(body: dict[str, Any]) -> bool:
    if "stream" not in body:
        # The old MLX-server shape (top-level max_tokens / category) came from clients that parse one object.
        return not any(body.get(k) is not None for k in ("max_tokens", "category"))
    stream = body["stream"]
    if not isinstance(stream, bool):
        raise BadRequest('invalid value for field "stream": expected a boolean')
    return stream


def base_request(incoming: Incoming) -> GenerateRequest:
    body = incoming.body
    apply_top_level_options(body)
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest('invalid value for field "options": expected an object')
    resolved = resolve_sampling(incoming.model_options, options or {}, OLLAMA_DEFAULTS)
    fmt = body.get("format")
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise BadRequest('invalid value for field "format": expected "json" or a JSON schema object')
    think, think_level = _think(body)
    logprobs, top_logprobs = _logprobs(body)
    return GenerateRequest(
        model=incoming.name,
        sampling=resolved.sampling,
        max_tokens=resolved.max_tokens,
        num_ctx=resolved.num_ctx,
        num_draft=resolved.num_draft,
        stop=resolved.stop,
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        format=fmt or None,
        think=think,
        think_level=think_level,
        tools=field_type(body, "tools", list, "an array of tool definitions"),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        truncate=field_type(body, "truncate", bool, "a boolean") is not False,  # Ollama's default: true
        shift=field_type(body, "shift", bool, "a boolean") is not False,  # Ollama's default: true
        num_keep=resolved.num_keep,
        priority=incoming.priority,
        timeout=incoming.timeout,
        created=incoming.arrival,
    )


def generate_request(incoming: Incoming) -> GenerateRequest:
    body = incoming.body
    req = base_request(incoming)
    prompt = field_type(body, "prompt", str, "a string")
    system = field_type(body, "system", str, "a string")
    template = field_type(body, "template", str, "a string")
    raw = bool(field_type(body, "raw", bool, "a boolean"))
    req.images = image_list(body.get("images"), "images")
    req.suffix = field_type(body, "suffix", str, "a string") or None
    if prompt:
        if template and not raw:
            prompt, raw = render_go_template(template, prompt=prompt, system=system or ""), True
        req.prompt, req.raw, req.system = prompt, raw, (None if raw else system)
    return req


def chat_request(incoming: Incoming) -> GenerateRequest:
    req = base_request(incoming)
    messages = parse_messages(incoming.body.get("messages"))
    attach_top_level_images(messages, incoming.body.get("images"))
    req.messages = messages or None
    return req


def _call(incoming: Incoming, req: GenerateRequest) -> Call:
    """A request with nothing to generate loads the model, or unloads it with keep_alive 0 (Ollama's idiom)."""
    stream = _stream(incoming.body)
    if not req.prompt and not req.messages:
        control: EngineRequest
        if req.keep_alive == 0:
            control = UnloadRequest(req.model, priority=req.priority, timeout=req.timeout, created=req.created)
        else:
            control = LoadRequest(
                req.model, keep_alive=req.keep_alive, priority=req.priority, timeout=req.timeout, created=req.created
            )
        return Call(control, stream=False, needs_generation=False)
    return Call(req, stream=stream, headers=incoming.tools_note(req.tools))


def build_generate(incoming: Incoming) -> Call:
    return _call(incoming, generate_request(incoming))


def build_chat(incoming: Incoming) -> Call:
    return _call(incoming, chat_request(incoming))


GENERATE = Generation(resolve_target, build_generate, encoder(chat=False), final_for(chat=False))
CHAT = Generation(resolve_target, build_chat, encoder(chat=True), final_for(chat=True), verb="chat")


# ---- model listing ------------------------------------------------------------------------------------------


async def root(request: Request) -> Response:
    if "application/json" in request.headers.get("accept", "") and request.method == "GET":
        ctx = ctx_of(request)
        present = [name for name, e in (await ctx.catalog.entries()).items() if e.located.present]
        return JSONResponse({"status": "running", "available_models": present, "version": OLLAMA_VERSION})
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


def _entry(known: Entry, label: str) -> Optional[dict[str, Any]]:
    found, info = known.located, known.info
    if not found.present or info is None:
        return None
    return {
        "name": label,
        "model": label,
        "modified_at": rfc3339(info.modified),
        "size": found.size,
        "digest": found.digest,
        "details": info.details(),
        "capabilities": info.capabilities,  # newer Ollama lists them too: clients pick vision models by it
        "exists": True,
    }


async def tags(request: Request) -> Response:
    ctx = ctx_of(request)
    known = await ctx.catalog.entries()
    # Each alias is an entry of its own, `model` = `name` = the alias, as Ollama lists a copied model: clients that
    # key the list by `model` (llm-ollama) would otherwise fold every alias into its target.
    labels = [*((name, name) for name in known), *((name, alias) for alias, name in ctx.config.aliases().items())]
    models = [e for name, label in labels if (e := _entry(known[name], label)) is not None]
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    ctx = ctx_of(request)
    body = await read_json(request)
    requested = field_type(body, "model", str, "a string") or field_type(body, "name", str, "a string")
    if not requested:
        raise BadRequest("model is required")
    name = await ctx.resolve(requested)
    info = await ctx.info(name)
    if info is None:
        raise MlxServerError(f'cannot read model files for "{name}"')
    cfg = ctx.config.models[name]
    params = "\n".join(f"{k} {json.dumps(v) if isinstance(v, str) else v}" for k, v in cfg.options.items())
    model_info = {
        "general.architecture": info.family,
        "general.parameter_count": info.parameter_count,
        **info.arch_info,
    }
    ctx_len = cfg.context_length or info.context_length
    if info.embedding is not None:  # inputs are cut there: sentence-transformers' length, or less if configured
        ctx_len = min(cfg.context_length or info.embedding.max_length, info.embedding.max_length)
    model_info[f"{info.family}.context_length"] = ctx_len
    shown: dict[str, Any] = {
        "modelfile": modelfile(cfg),
        "parameters": params,
        "template": cfg.template or info.template,
        "details": info.details(),
        "model_info": model_info,
        "capabilities": info.capabilities,
        "modified_at": rfc3339(info.modified),
    }
    if cfg.system is not None:
        shown["system"] = cfg.system
    if cfg.license:
        shown["license"] = "\n".join(cfg.license)
    if cfg.messages:
        shown["messages"] = [dict(m) for m in cfg.messages]
    return JSONResponse(shown)


def modelfile(cfg: ModelConfig) -> str:
    """The model as an Ollama Modelfile: FROM, then each layer that is set."""
    lines = ["# served by mlx-server", f"FROM {cfg.source}"]
    if cfg.template:
        lines.append(f'TEMPLATE """{cfg.template}"""')
    if cfg.system is not None:
        lines.append(f'SYSTEM """{cfg.system}"""')
    for key, value in cfg.options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(item) if isinstance(item, str) else item}")
    lines.extend(f"MESSAGE {m.get('role')} {json.dumps(m.get('content', ''))}" for m in cfg.messages)
    lines.extend(f'LICENSE """{text}"""' for text in cfg.license)
    return "\n".join(lines) + "\n"


async def ps(request: Request) -> Response:
    ctx = ctx_of(request)
    now_mono, now_wall = time.monotonic(), time.time()
    models = []
    for r in ctx.engine.status().models:
        if r.is_loading:
            continue
        found = await ctx.catalog.entry(r.name)
        entry = _entry(found, r.name) or {"name": r.name, "model": r.name, "digest": "", "details": {}}
        if r.expires_at is None:
            expires = FAR_FUTURE
        else:
            expires = rfc3339(dt.datetime.fromtimestamp(now_wall + (r.expires_at - now_mono), tz=dt.timezone.utc))
        # Distributed, the pool counts this rank's share; Ollama's size is the whole model.
        item = {
            "name": r.name,
            "model": r.name,
            "size": r.size * r.shards,
            "size_vram": r.size * r.shards,
            "digest": entry["digest"],
            "details": entry["details"],
            "expires_at": expires,
            "context_length": r.context_length,
            "kv_cache": {"type": r.kv_cache, "bytes_per_token": r.kv_bytes_per_token},
        }  # what the loaded model really has
        if r.draft:
            item["draft"] = r.draft  # speculative decoding: the draft model, or prompt-lookup
        if r.shards > 1:
            item["sharded"] = {"ranks": r.shards, "method": r.split, "size_per_rank": r.size}
        models.append(item)
    return JSONResponse({"models": models})


__all__ = [
    "CHAT",
    "GENERATE",
    "error_body",
    "error_frame",
    "http_error_body",
    "line",
    "ps",
    "root",
    "show",
    "stream_response",
    "tags",
    "version",
]
