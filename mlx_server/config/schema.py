"""The shape of models.yaml as pydantic models: validation with key paths, and the JSON Schema in docs/.

These models only check the file; mlx_server.config.load turns a validated document into the frozen typed tree the
rest of the server reads. `python -m mlx_server.config.schema` prints the JSON Schema (docs/models.schema.json).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from mlx_server.config.load import DEFAULT_PORT, ServerConfig, parse_duration, parse_size


def _empty_if_none(empty: Any) -> BeforeValidator:
    # An empty YAML section (`server:` with nothing under it) parses as null; it means "all defaults".
    return BeforeValidator(lambda value: empty() if value is None else value)


def _not_negative(seconds: float) -> float:
    if seconds < 0:  # parse_duration folds every negative duration into -1 ("forever")
        raise ValueError("must not be negative")
    return seconds


def _budget(value: Any) -> Any:
    parse_size(value, total=1)  # the real total is only read (from psutil) once the whole file is valid
    return value


def _nonblank(name: str) -> str:
    if not name.strip():
        raise ValueError("model names must be non-empty strings")
    return name


_DURATION_TEXT = "seconds, or a Go duration such as 5m or 1h30m; negative means forever"
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=Union[float, str])]
NonNegativeDuration = Annotated[Duration, AfterValidator(_not_negative)]
Size = Annotated[int, BeforeValidator(parse_size, json_schema_input_type=Union[int, str])]
Strings = Annotated[list[str], _empty_if_none(list)]


def _default(key: str) -> Any:
    # One source of truth for defaults: the typed tree's, so the schema cannot drift from what the server uses.
    return ServerConfig.__dataclass_fields__[key].default


class _Section(BaseModel):
    # strict: YAML already has types, so "8080" for a port or yes/no strings for booleans are mistakes to report.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ServerSection(_Section):
    """The `server` section: how the process listens, its memory budget and its limits."""

    host: str = Field(_default("host"), description="address to bind (env MLX_SERVER_HOST)")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port (env MLX_SERVER_PORT)")
    memory_budget: Annotated[Union[int, float, str], BeforeValidator(_budget)] = Field(
        _default("memory_budget_spec"), description="bytes for weights and KV: a size (96GB, 512MiB) or a "
                                                    "percentage of physical RAM (75%)")
    max_loaded_models: int = Field(_default("max_loaded_models"), ge=1, description="models resident at once")
    keep_alive: Duration = Field(_default("keep_alive"), description=f"default keep_alive: {_DURATION_TEXT}")
    default_model: Optional[str] = Field(None, description="model or alias for requests that name none")
    cache_dir: Optional[str] = Field(None, description="imported GGUF models (default ~/.cache/mlx-server; "
                                                       "env MLX_SERVER_CACHE_DIR)")
    max_queue: int = Field(_default("max_queue"), ge=0, description="requests allowed to wait before 503")
    max_concurrent: int = Field(_default("max_concurrent"), ge=1, description="sequences decoding at once")
    prompt_cache_bytes: Size = Field(_default("prompt_cache_bytes"), description="cap on stored prompt caches")
    prefill_slice: NonNegativeDuration = Field(
        _default("prefill_slice"), description="prompt prefill done between two decode steps, in seconds (0: each "
                                               "prompt whole, as mlx_lm does, freezing running streams meanwhile)")
    prefill_chunk: int = Field(_default("prefill_chunk"), ge=1, description="most prompt tokens per forward pass "
                                                                            "(bounds activation memory)")
    request_timeout: Optional[NonNegativeDuration] = Field(None, description="fail a request running longer")
    shutdown_grace: NonNegativeDuration = Field(_default("shutdown_grace"),
                                                description="time in-flight requests get after SIGTERM")
    fallback_url: Optional[str] = Field(None, description="an Ollama to proxy models not served here to")
    fallback_when_busy: bool = Field(False, description="also proxy requests this server would refuse")
    api_key: Optional[str] = Field(None, description="require this bearer key (env MLX_SERVER_API_KEY)")
    allowed_hosts: Strings = Field([], description="extra Host header names accepted")
    origins: Strings = Field([], description="CORS origins (default: local pages only)")
    max_body_bytes: Size = Field(_default("max_body_bytes"), description="larger request bodies get 413")
    rate_limit_per_minute: Optional[int] = Field(None, ge=1, description="per client, generation routes")
    log_format: Literal["text", "json"] = Field(_default("log_format"), description="json: one object per line")


class ModelSection(_Section):
    """One served model, keyed by its name (Ollama style, e.g. qwen2.5-coder:32b)."""

    source: str = Field(description="HF repo id, local dir, .gguf path, package:MODULE/FILE, or ollama:NAME[:TAG] "
                                    "(a model in the local Ollama store)")
    aliases: Strings = Field([], description="other names that resolve to this model")
    preload: bool = Field(False, description="load at start-up (mlx-server preload --preload-only)")
    keep_alive: Optional[Duration] = Field(None, description=f"overrides server.keep_alive: {_DURATION_TEXT}")
    context_length: Optional[int] = Field(None, ge=1, description="default num_ctx (else the model's own)")
    options: Annotated[dict[str, Any], _empty_if_none(dict)] = Field(
        {}, description="default Ollama options for this model (temperature, num_ctx, ...)")
    priority: int = Field(100, description="preload and warm order; lower first")
    system: Optional[str] = Field(None, description="default system prompt for requests that send none (an "
                                                    "ollama: source's system layer otherwise)")
    kind: Optional[Literal["generation", "embedding"]] = Field(
        None, description="what the model does (default: inferred from its files, e.g. sentence-transformers "
                          "configs mean embedding)")
    parallel: Literal["auto", "tensor", "pipeline"] = Field(
        "auto", description="serve --distributed: how the model is split across ranks (auto: tensor parallel when "
                            "its mlx_lm class has shard(), else pipeline when it has pipeline())")


ModelName = Annotated[str, AfterValidator(_nonblank)]


class ModelsFile(_Section):
    """models.yaml: the models this server serves, and how it serves them."""

    model_config = ConfigDict(title="models.yaml")

    server: Annotated[ServerSection, _empty_if_none(dict)] = Field(default_factory=ServerSection)
    models: Annotated[dict[ModelName, Annotated[ModelSection, _empty_if_none(dict)]], _empty_if_none(dict)] = Field(
        default_factory=dict)


# ---- errors -------------------------------------------------------------------------------------------------

Loc = tuple[Union[int, str], ...]


def key_path(loc: Loc) -> str:
    """pydantic's location → the dotted path an operator sees in the file: models.phi3:mini-4k.aliases[0]."""
    out = ""
    for i, part in enumerate(loc):
        if part == "[key]":  # the error is about a mapping key itself (a model name), which the path already names
            continue
        if isinstance(part, int) and not (i == 1 and loc[0] == "models"):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _section(parent: Loc) -> Optional[type[_Section]]:
    if parent == ():
        return ModelsFile
    if parent == ("server",):
        return ServerSection
    return ModelSection if len(parent) == 2 and parent[0] == "models" else None


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as a sentence that says what is allowed, in the terms models.yaml uses."""
    kind, loc, msg = error["type"], tuple(error["loc"]), str(error["msg"])
    section = _section(loc[:-1])
    if kind == "extra_forbidden" and section is not None:
        return f"unknown key (allowed: {', '.join(sorted(section.model_fields))})"
    if kind == "missing" and section is not None and loc[-1] in section.model_fields:
        return f"required ({section.model_fields[str(loc[-1])].description})"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in ("model_type", "dict_type"):
        msg = "expected a mapping"  # not pydantic's "instance of ServerSection": the reader wrote YAML, not Python
    value = error.get("input")
    return f"{msg[:1].lower()}{msg[1:]}, got {type(value).__name__} {value!r}"[:300]


def errors_of(exc: ValidationError) -> list[tuple[str, str]]:
    """(key path, message) for every error, in file order."""
    return [(key_path(tuple(e["loc"])), describe_error(e)) for e in exc.errors(include_url=False)]


# ---- the JSON Schema ----------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    schema = ModelsFile.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(json_schema_text())
