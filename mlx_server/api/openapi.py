"""GET /openapi.json: an OpenAPI 3.1 document of every route and the request bodies it accepts.

The paths come from the dialect registry (api/routes.py); the schemas are hand-written and state what the
handlers check, with their ranges, so a client generator or a schema fuzzer (tests/test_fuzz.py validates its
valid cases against it) sees the same contract the server enforces. Unknown fields are allowed everywhere, as
the dialects ignore them.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_server.api.dialects.base import Endpoint
from mlx_server.api.routes import ENDPOINTS, dialect_for

JSON = dict[str, Any]


def _obj(required: list[str], **props: JSON) -> JSON:
    return {"type": "object", "required": required, "properties": props, "additionalProperties": True}


def _num(lo: float, hi: float) -> JSON:
    return {"type": "number", "minimum": lo, "maximum": hi}


STR: JSON = {"type": "string"}
BOOL: JSON = {"type": "boolean"}
INT: JSON = {"type": "integer"}
INT64: JSON = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
STOP: JSON = {"oneOf": [STR, {"type": "array", "items": STR}]}
KEEP_ALIVE: JSON = {
    "description": 'seconds, or a Go duration such as "5m" or "1h30m"; negative = forever',
    "oneOf": [{"type": "number"}, {"type": "string", "pattern": r"^\s*[+-]?(\d|\.\d)"}],
}
FORMAT: JSON = {"oneOf": [{"enum": ["", "json"]}, {"type": "object", "description": "a JSON schema"}]}
THINK: JSON = {"oneOf": [BOOL, {"enum": ["low", "medium", "high", "max"]}]}

OLLAMA_OPTIONS: JSON = {
    "type": "object",
    "additionalProperties": True,
    "description": "Ollama options; unknown keys are ignored, known keys are type-checked",
    "properties": {
        "num_predict": {**INT64, "description": "<= 0 means until the context is full"},
        "num_ctx": {**INT64, "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": _num(0, 1),
        "top_k": {**INT64, "minimum": 0},
        "min_p": {"type": "number"},
        "repeat_penalty": {"type": "number", "exclusiveMinimum": 0},
        "repeat_last_n": INT64,
        "presence_penalty": {"type": "number"},
        "frequency_penalty": {"type": "number"},
        "seed": {**INT64, "description": "negative means random"},
        "stop": STOP,
    },
}
IMAGES: JSON = {
    "type": "array",
    "items": STR,
    "description": "base64 images (a data: URL prefix allowed), or http(s) URLs of hosts in server.fetch_image_urls",
}
OLLAMA_MESSAGE = _obj(
    ["role"],
    role=STR,
    content=STR,
    thinking=STR,
    images=IMAGES,
    tool_calls={"type": "array"},
    tool_name=STR,
)
OLLAMA_COMMON: JSON = {
    "model": STR,
    "category": {**STR, "description": "MLX-style: an alias to resolve"},
    "stream": {**BOOL, "default": True},
    "options": OLLAMA_OPTIONS,
    "keep_alive": KEEP_ALIVE,
    "format": FORMAT,
    "think": THINK,
    "logprobs": BOOL,
    "top_logprobs": {**INT, "minimum": 0, "maximum": 20},
    "truncate": BOOL,
    "shift": {**BOOL, "default": True, "description": "continue past a full window by dropping the oldest tokens"},
    "tools": {"type": "array"},
    "max_tokens": INT64,
    "temperature": {"type": "number"},
    "top_p": _num(0, 1),
}
OLLAMA_GENERATE = _obj(
    [],
    prompt=STR,
    suffix=STR,
    system=STR,
    template=STR,
    raw=BOOL,
    images=IMAGES,
    **OLLAMA_COMMON,
)
OLLAMA_CHAT = _obj(
    [],
    messages={"type": "array", "items": OLLAMA_MESSAGE},
    images={**IMAGES, "description": "added to the last user message's images"},
    **OLLAMA_COMMON,
)
MODEL_REF = _obj([], model=STR, name=STR, stream=BOOL)
DIMENSIONS: JSON = {**INT64, "minimum": 1, "description": "cut each vector to this width, then re-normalize"}
OLLAMA_EMBED = _obj(
    ["model"],
    model=STR,
    input={"oneOf": [STR, {"type": "array", "items": STR}]},
    truncate={**BOOL, "default": True},
    dimensions=DIMENSIONS,
    keep_alive=KEEP_ALIVE,
    options=OLLAMA_OPTIONS,
)
OLLAMA_EMBEDDINGS = _obj(["model"], model=STR, prompt=STR, keep_alive=KEEP_ALIVE, options=OLLAMA_OPTIONS)
TOKEN_IDS: JSON = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
OPENAI_EMBEDDING = _obj(
    ["model", "input"],
    model={**STR, "minLength": 1},
    input={
        "oneOf": [
            STR,
            {"type": "array", "minItems": 1, "items": STR},
            TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": TOKEN_IDS},
        ]
    },
    encoding_format={"enum": ["float", "base64"]},
    dimensions=DIMENSIONS,
    user=STR,
)

TEXT_PART = _obj(["type"], type={"enum": ["text", "input_text"]}, text=STR)
IMAGE_URL: JSON = {"oneOf": [STR, _obj(["url"], url=STR, detail=STR)], "description": "a data: URL or an http(s) URL"}
IMAGE_PART = _obj(["type", "image_url"], type={"enum": ["image_url", "input_image"]}, image_url=IMAGE_URL)
OPENAI_MESSAGE = _obj(
    ["role"],
    role={"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
    content={"oneOf": [STR, {"type": "null"}, {"type": "array", "items": {"oneOf": [TEXT_PART, IMAGE_PART]}}]},
    tool_calls={"type": "array"},
    tool_call_id=STR,
    name=STR,
    reasoning_content=STR,
)
OPENAI_SAMPLING: JSON = {
    "model": {**STR, "minLength": 1},
    "stream": BOOL,
    "stop": STOP,
    "seed": INT,
    "temperature": _num(0, 2),
    "top_p": _num(0, 1),
    "top_k": {**INT, "minimum": 0},
    "min_p": _num(0, 1),
    "repeat_penalty": _num(0.01, 10),
    "presence_penalty": _num(-2, 2),
    "frequency_penalty": _num(-2, 2),
    "n": {**INT, "minimum": 1, "maximum": 1},
    "max_tokens": {**INT, "minimum": 1},
}
OPENAI_CHAT = _obj(
    ["model", "messages"],
    messages={"type": "array", "minItems": 1, "items": OPENAI_MESSAGE},
    max_completion_tokens={**INT, "minimum": 1},
    logprobs=BOOL,
    top_logprobs={**INT, "minimum": 0, "maximum": 20},
    stream_options=_obj([], include_usage=BOOL),
    tools={"type": "array"},
    tool_choice={"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
    response_format=_obj(["type"], type={"enum": ["text", "json_object", "json_schema"]}),
    reasoning_effort=STR,
    **OPENAI_SAMPLING,
)
OPENAI_COMPLETION = _obj(
    ["model", "prompt"],
    prompt={"oneOf": [STR, {"type": "array", "items": STR, "minItems": 1, "maxItems": 1}]},
    suffix=STR,
    echo=BOOL,
    logprobs={**INT, "minimum": 0, "maximum": 5},
    **OPENAI_SAMPLING,
)

RESPONSES_ITEM = _obj(
    [],
    type={"enum": ["message", "function_call", "function_call_output", "reasoning"]},
    role={"enum": ["user", "system", "developer", "assistant"]},
)
RESPONSES_CREATE = _obj(
    ["model"],
    model={**STR, "minLength": 1},
    input={"oneOf": [STR, {"type": "array", "items": RESPONSES_ITEM}]},
    instructions=STR,
    previous_response_id=STR,
    max_output_tokens={**INT, "minimum": 1},
    temperature=_num(0, 2),
    top_p=_num(0, 1),
    stream=BOOL,
    store=BOOL,
    tools={"type": "array"},
    tool_choice={"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
    text=_obj([], format=_obj(["type"], type={"enum": ["text", "json_object", "json_schema"]})),
    reasoning=_obj([], effort=STR, summary={"type": ["string", "null"]}),
    include={"type": "array", "items": STR},
)

ANTHROPIC_BLOCK = _obj(
    ["type"], type={"enum": ["text", "thinking", "redacted_thinking", "tool_use", "tool_result", "image"]}
)
ANTHROPIC_MESSAGE = _obj(
    ["role", "content"],
    role={"enum": ["user", "assistant"]},
    content={"oneOf": [STR, {"type": "array", "items": ANTHROPIC_BLOCK}]},
)
ANTHROPIC_COMMON: JSON = {
    "model": {**STR, "minLength": 1},
    "messages": {"type": "array", "minItems": 1, "items": ANTHROPIC_MESSAGE},
    "system": {"oneOf": [STR, {"type": "array", "items": ANTHROPIC_BLOCK}]},
    "tools": {"type": "array"},
    "tool_choice": _obj(["type"], type={"enum": ["auto", "any", "tool", "none"]}, name=STR),
    "thinking": _obj(["type"], type={"enum": ["enabled", "disabled", "adaptive"]}),
}
ANTHROPIC_MESSAGES = _obj(
    ["model", "messages", "max_tokens"],
    max_tokens={**INT, "minimum": 1},
    stream=BOOL,
    temperature=_num(0, 1),
    top_p=_num(0, 1),
    top_k={**INT, "minimum": 0},
    stop_sequences={"type": "array", "items": STR},
    output_config={"type": "object"},
    **ANTHROPIC_COMMON,
)
ANTHROPIC_COUNT = _obj(["model", "messages"], **ANTHROPIC_COMMON)

RERANK = _obj(
    ["model", "query", "documents"],
    model={**STR, "minLength": 1},
    query=STR,
    documents={"type": "array", "items": {"oneOf": [STR, _obj(["text"], text=STR)]}},
    top_n={**INT64, "minimum": 0, "description": "results kept, best first; absent or 0: all"},
    return_documents={**BOOL, "default": True},
    instruction={**STR, "description": "a decoder reranker's task line (Qwen3-Reranker's Instruct)"},
    keep_alive=KEEP_ALIVE,
    options=OLLAMA_OPTIONS,
)

OLLAMA_CREATE = _obj(
    ["model"],
    model={**STR, "description": "the new name ([namespace/]model[:tag]; no tag means :latest)"},
    **{"from": {**STR, "description": "a model served here or in Ollama's store to build on (weights shared)"}},
    files={
        "type": "object",
        "additionalProperties": STR,
        "description": "file name to sha256:<hex> of an uploaded blob: one .gguf, or config.json + tokenizer + "
        "*.safetensors",
    },
    quantize={**STR, "description": "q4, q8, int4, int8 or Ollama's q4_K_M, q8_0, ... (float safetensors only)"},
    template={**STR, "description": "a Jinja chat template (Go templates are refused)"},
    system=STR,
    parameters={"type": "object", "description": "default Ollama options"},
    messages={"type": "array", "items": _obj(["role"], role=STR, content=STR)},
    license={"oneOf": [STR, {"type": "array", "items": STR}]},
    stream={**BOOL, "default": True},
)
OLLAMA_COPY = _obj(["source", "destination"], source=STR, destination=STR)

ERRORS: JSON = {
    "OllamaError": _obj(["error"], error=STR),
    "OpenAIError": _obj(["error"], error=_obj(["message", "type"], message=STR, type=STR)),
    "AnthropicError": _obj(
        ["type", "error"], type={"const": "error"}, error=_obj(["type", "message"], type=STR, message=STR)
    ),
}
SCHEMAS: JSON = {
    "OllamaGenerateRequest": OLLAMA_GENERATE,
    "OllamaChatRequest": OLLAMA_CHAT,
    "ModelReference": MODEL_REF,
    "OllamaCreateRequest": OLLAMA_CREATE,
    "OllamaCopyRequest": OLLAMA_COPY,
    "OllamaEmbedRequest": OLLAMA_EMBED,
    "OllamaEmbeddingsRequest": OLLAMA_EMBEDDINGS,
    "EmbeddingRequest": OPENAI_EMBEDDING,
    "ChatCompletionRequest": OPENAI_CHAT,
    "CompletionRequest": OPENAI_COMPLETION,
    "MessagesRequest": ANTHROPIC_MESSAGES,
    "CountTokensRequest": ANTHROPIC_COUNT,
    "ResponsesRequest": RESPONSES_CREATE,
    "RerankRequest": RERANK,
    **ERRORS,
}


def _routes() -> dict[str, dict[str, tuple[str, Any, str, bool, bool]]]:
    """path → (method → (summary, request schema name or None, error schema name, streams, upload)), from the
    registry."""
    out: dict[str, dict[str, tuple[str, Any, str, bool, bool]]] = {}
    for e in (*ENDPOINTS, OPENAPI):
        path = e.path.replace("{model:path}", "{model}")
        error = dialect_for(e.path).error_schema
        for method in e.methods:
            # Starlette answers HEAD for every GET, so documenting GET says it all; a HEAD-only route is its own.
            if method != "HEAD" or "GET" not in e.methods:
                out.setdefault(path, {})[method.lower()] = (e.summary, e.schema, error, e.streams, e.upload)
    return out


def _operation(summary: str, body: Any, error: str, streams: bool, upload: bool, path: str) -> JSON:
    ok: JSON = {"description": "OK", "content": {"application/json": {}}}
    if streams:
        ok["content"]["application/x-ndjson" if path.startswith("/api/") else "text/event-stream"] = {}
    err = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}}
    op: JSON = {
        "summary": summary,
        "responses": {
            "200": ok,
            "400": {"description": "invalid request", **err},
            "404": {"description": "unknown model", **err},
            "413": {"description": "body too large", **err},
            "503": {"description": "designed refusal: queue full, memory budget, shutting down", **err},
        },
    }
    if body:
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if upload:
        op["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
        op["responses"]["201"] = {"description": "stored"}
        op["responses"]["413"] = {"description": "larger than server.max_blob_bytes", **err}
        op["responses"]["507"] = {"description": "not enough disk space", **err}
    for name in ("model", "response_id", "digest"):
        if "{" + name + "}" in path:
            op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": STR}]
    op["x-request-priority"] = "X-Request-Priority: high | medium | low (generation routes)"
    return op


def document() -> JSON:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-server",
            "version": "1",
            "description": "Ollama, OpenAI and Anthropic dialects over one MLX engine.",
        },
        "paths": {
            path: {method: _operation(*spec, path=path) for method, spec in ops.items()} for path, ops in ROUTES.items()
        },
        "components": {"schemas": SCHEMAS},
    }


def request_schema(path: str, method: str = "post") -> JSON:
    """The request body schema of a route (self-contained: no $refs), for validators and fuzzers."""
    name = ROUTES[path][method][1]
    return SCHEMAS[name] if name else {}


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document())


OPENAPI = Endpoint("/openapi.json", ("GET",), "This document", handler=openapi_json)
ROUTES = _routes()
routes = [Route(OPENAPI.path, openapi_json, methods=list(OPENAPI.methods))]

__all__ = ["document", "request_schema", "routes"]
