"""The typed config tree: frozen pydantic models that both check models.yaml and are what the server reads.

Every key is declared once, here, with its type, default, bounds and description; the JSON Schema in
docs/models.schema.json is generated from these classes (mlx_server.config.schema). A few attributes follow from the
file without being keys in it: a model's `name` is its key under `models`, `memory_budget_spec` is what
`memory_budget` said before it became bytes, and `Config.path` is the file that was read. They are private attributes
behind read-only properties, so a file cannot set them and the schema does not offer them.

Validating with a `FileContext` (what mlx_server.config.load does) means "this is a file": those derived keys are
then unknown keys, percentages use the given total memory, and `ollama:` sources get the caller's layers. Code may
also build the tree directly (`ModelConfig(name="m", source="x/y")`), as it could build the old dataclasses.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Mapping, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from mlx_server.config.table import Extra, ModelTable
from mlx_server.config.units import is_percentage, parse_duration, parse_size

DEFAULT_PORT = 11435

# (default options, default system prompt) of an `ollama:` source. The caller supplies it: reading the Ollama store is
# the business of the models package, a layer above this one.
Layers = Callable[[str], tuple[Mapping[str, Any], Optional[str]]]


@dataclass(frozen=True)
class FileContext:
    """What validating a file knows beyond the document: where it is, the machine's memory, the Ollama layers."""

    path: Optional[Path] = None
    total_memory: Optional[Callable[[], int]] = None
    layers: Optional[Layers] = None


def _file(info: ValidationInfo) -> Optional[FileContext]:
    return info.context if isinstance(info.context, FileContext) else None


def _physical_memory() -> int:
    import psutil  # deferred: only needed when a percentage is used

    return int(psutil.virtual_memory().total)


# ---- value types: what the file may write, and what the tree holds -------------------------------------------


def _empty_if_none(empty: Callable[[], Any]) -> BeforeValidator:
    # An empty YAML section (`server:` with nothing under it) parses as null; it means "all defaults".
    return BeforeValidator(lambda value: empty() if value is None else value)


def _strings(value: Any) -> Any:
    # YAML has lists, the tree tuples (hashable, like the dataclasses'); strict checking then sees a tuple.
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else value


def _not_negative(seconds: float) -> float:
    if seconds < 0:  # parse_duration folds every negative duration into -1 ("forever")
        raise ValueError("must not be negative")
    return seconds


def _nonblank(name: str) -> str:
    if not name.strip():
        raise ValueError("model names must be non-empty strings")
    return name


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mlx-server"


def directory(value: Any) -> Any:
    if value is None:
        return _default_cache_dir()
    if isinstance(value, (str, Path)):
        return Path(value).expanduser()
    raise ValueError(f"expected a directory path, got {type(value).__name__} {value!r}")


def _budget(value: Any, info: ValidationInfo) -> int:
    if not is_percentage(value):
        return parse_size(value)
    parse_size(value, total=1)  # a malformed percentage is reported without reading the machine's memory
    context = _file(info)
    total = context.total_memory if context is not None and context.total_memory is not None else _physical_memory
    return parse_size(value, total())


_DURATION_TEXT = "seconds, or a Go duration such as 5m or 1h30m; negative means forever"
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=Union[float, str])]
NonNegativeDuration = Annotated[Duration, AfterValidator(_not_negative)]
Size = Annotated[int, BeforeValidator(parse_size, json_schema_input_type=Union[int, str])]

# Ollama's OLLAMA_KV_CACHE_TYPE names mean the same settings.
_KV_NAMES = {"f16": "f16", "fp16": "f16", "q8": "q8", "q8_0": "q8", "q4": "q4", "q4_0": "q4"}


def _kv_type(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _KV_NAMES:
        return _KV_NAMES[value.strip().lower()]
    return value


PROMPT_LOOKUP = "prompt-lookup"  # `draft:` value for n-gram drafting from the prompt, no second model
KVType = Annotated[Literal["f16", "q8", "q4"], BeforeValidator(_kv_type, json_schema_input_type=str)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_strings, json_schema_input_type=list[str])]
Budget = Annotated[int, BeforeValidator(_budget, json_schema_input_type=Union[int, float, str])]
Directory = Annotated[Path, BeforeValidator(directory, json_schema_input_type=Optional[str])]
ModelName = Annotated[str, AfterValidator(_nonblank)]

# A spec, not bytes: validate_default turns it into bytes of this machine. Typed Any so the int field may hold it.
_DEFAULT_BUDGET: Any = "75%"


class _Frozen(BaseModel):
    # strict: YAML already has types, so "8080" for a port or yes/no strings for booleans are mistakes to report.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    # As with the dataclasses this replaces: no attribute can be set, the derived (private) ones included, which
    # pydantic's frozen alone would allow; FrozenInstanceError is what such code already expects.
    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _derive(self, **values: Any) -> None:
        private = self.__pydantic_private__
        assert private is not None, "every tree class declares its derived attributes"
        private.update({f"_{key}": value for key, value in values.items()})


def _taken(data: Any, info: ValidationInfo, key: str) -> tuple[Any, Any]:
    """(data without `key`, its value) when code builds the tree; a file keeps the key, to be told it is unknown."""
    if _file(info) is not None or not isinstance(data, Mapping) or key not in data:
        return data, None
    rest = dict(data)
    return rest, rest.pop(key)


# ---- the tree -----------------------------------------------------------------------------------------------


class ServerConfig(_Frozen):
    """The `server` section: how the process listens, its memory budget and its limits."""

    _memory_budget_spec: str = PrivateAttr(_DEFAULT_BUDGET)

    host: str = Field(default="127.0.0.1", description="address to bind (env MLX_SERVER_HOST)")
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="TCP port (env MLX_SERVER_PORT)")
    memory_budget: Budget = Field(
        default=_DEFAULT_BUDGET,
        validate_default=True,
        description="bytes for weights and KV: a size (96GB, 512MiB) or a percentage of physical RAM (75%)",
    )
    max_loaded_models: int = Field(default=3, ge=1, description="models resident at once")
    keep_alive: Duration = Field(default=300.0, description=f"default keep_alive: {_DURATION_TEXT}")
    default_model: Optional[str] = Field(default=None, description="model or alias for requests that name none")
    cache_dir: Directory = Field(
        default_factory=_default_cache_dir,
        description="imported GGUF models (default ~/.cache/mlx-server; env MLX_SERVER_CACHE_DIR)",
    )
    max_queue: int = Field(default=256, ge=0, description="requests allowed to wait before 503")
    max_concurrent: int = Field(default=16, ge=1, description="sequences decoding at once")
    prompt_cache_bytes: Size = Field(default=2 * 2**30, description="cap on stored prompt caches")
    prefill_slice: NonNegativeDuration = Field(
        default=0.05,
        description="prompt prefill done between two decode steps, in seconds (0: each prompt whole, "
        "as mlx_lm does, freezing running streams meanwhile)",
    )
    prefill_chunk: int = Field(
        default=2048, ge=1, description="most prompt tokens per forward pass (bounds activation memory)"
    )
    request_timeout: Optional[NonNegativeDuration] = Field(default=None, description="fail a request running longer")
    shutdown_grace: NonNegativeDuration = Field(default=10.0, description="time in-flight requests get after SIGTERM")
    fallback_url: Optional[str] = Field(default=None, description="an Ollama to proxy models not served here to")
    fallback_when_busy: bool = Field(default=False, description="also proxy requests this server would refuse")
    api_key: Optional[str] = Field(default=None, description="require this bearer key (env MLX_SERVER_API_KEY)")
    allowed_hosts: Strings = Field(default=(), description="extra Host header names accepted")
    origins: Strings = Field(default=(), description="CORS origins (default: local pages only)")
    max_body_bytes: Size = Field(default=32 * 2**20, description="larger request bodies get 413")
    rate_limit_per_minute: Optional[int] = Field(default=None, ge=1, description="per client, generation routes")
    log_format: Literal["text", "json"] = Field(default="text", description="json: one object per line")
    kv_cache: KVType = Field(
        default="f16",
        description="KV cache storage for every model: f16 (the weights' float type), q8 or q4 (quantized, group "
        "size 64; Ollama's f16 / q8_0 / q4_0 accepted; env OLLAMA_KV_CACHE_TYPE)",
    )
    max_images: int = Field(default=8, ge=0, description="images one request may carry (more get 400)")
    responses_store: int = Field(
        default=1000, ge=0, description="/v1/responses kept for previous_response_id and GET (least recent go first)"
    )
    responses_store_bytes: Size = Field(default=256 * 2**20, description="cap on the stored responses' JSON bytes")
    responses_ttl: Duration = Field(
        default=24 * 3600.0, description=f"a stored response expires after: {_DURATION_TEXT}"
    )
    max_image_bytes: Size = Field(default=20 * 2**20, description="larger images (decoded bytes) get 400")
    max_blob_bytes: Size = Field(
        default=256 * 2**30, description="largest upload to POST /api/blobs (ollama create's files); larger get 413"
    )
    fetch_image_urls: Strings = Field(
        default=(),
        description="hosts whose http(s) image URLs the server fetches; by default it fetches none (base64 only)",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _keep_budget_spec(
        cls, data: Any, handler: ModelWrapValidatorHandler[ServerConfig], info: ValidationInfo
    ) -> ServerConfig:
        data, spec = _taken(data, info, "memory_budget_spec")
        if spec is None and isinstance(data, Mapping):
            spec = data.get("memory_budget", _DEFAULT_BUDGET)
        server = handler(data)
        if spec is not None:
            server._derive(memory_budget_spec=str(spec))
        return server

    @property
    def memory_budget_spec(self) -> str:
        """memory_budget as written ("75%", "96GB"): what status pages show beside the bytes."""
        return self._memory_budget_spec

    def __repr_args__(self) -> Iterator[tuple[Optional[str], Any]]:
        yield from super().__repr_args__()
        yield "memory_budget_spec", self.memory_budget_spec


class ModelConfig(_Frozen):
    """One served model, keyed by its name (Ollama style, e.g. qwen2.5-coder:32b)."""

    _name: str = PrivateAttr("")

    source: str = Field(
        description="HF repo id, local dir, .gguf path, package:MODULE/FILE, or ollama:NAME[:TAG] "
        "(a model in the local Ollama store)"
    )
    aliases: Strings = Field(default=(), description="other names that resolve to this model")
    preload: bool = Field(default=False, description="load at start-up (mlx-server preload --preload-only)")
    keep_alive: Optional[Duration] = Field(default=None, description=f"overrides server.keep_alive: {_DURATION_TEXT}")
    context_length: Optional[int] = Field(default=None, ge=1, description="default num_ctx (else the model's own)")
    options: Annotated[Mapping[str, Any], _empty_if_none(dict)] = Field(
        default={}, description="default Ollama options for this model (temperature, num_ctx, ...)"
    )
    priority: int = Field(default=100, description="preload and warm order; lower first")
    system: Optional[str] = Field(
        default=None,
        description="default system prompt for requests that send none (an ollama: source's system layer otherwise)",
    )
    kind: Optional[Literal["generation", "embedding", "vision", "rerank"]] = Field(
        default=None,
        description="what the model does (default: inferred from its files, e.g. "
        "sentence-transformers configs mean embedding, a vision_config means vision, a one-label "
        "sequence-classification head or a Qwen3-Reranker name means rerank)",
    )
    kv_cache: Optional[KVType] = Field(default=None, description="overrides server.kv_cache for this model")
    draft: Optional[str] = Field(
        default=None,
        description="speculative decoding: another configured model with the same vocabulary that drafts tokens "
        "for this one to verify, or prompt-lookup (n-gram drafts from the prompt and the text so far)",
    )
    num_draft: int = Field(
        default=4,
        ge=0,
        le=32,
        description="tokens drafted per step when draft is set (0: off); a request's draft_num_predict option wins",
    )
    template: Optional[str] = Field(
        default=None,
        description="a Jinja chat template used instead of the model's own (as tokenizer_config.json's "
        "chat_template); Ollama's Go templates are not rendered",
    )
    messages: Annotated[tuple[Mapping[str, Any], ...], BeforeValidator(_strings, json_schema_input_type=list[Any])] = (
        Field(default=(), description="conversation turns put before every chat's own (Ollama's MESSAGE lines)")
    )
    license: Strings = Field(default=(), description="license text(s) /api/show reports")
    max_pixels: int = Field(
        default=1024 * 1024,
        ge=28 * 28,
        description="vision models: larger images are scaled down to this many pixels before the processor "
        "(bounds the vision tower's tokens and activation memory)",
    )
    parallel: Literal["auto", "tensor", "pipeline"] = Field(
        default="auto",
        description="serve --distributed: how the model is split across ranks (auto: tensor parallel "
        "when its mlx_lm class has shard(), else pipeline when it has pipeline())",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _named(cls, data: Any, handler: ModelWrapValidatorHandler[ModelConfig], info: ValidationInfo) -> ModelConfig:
        data, name = _taken(data, info, "name")
        model = handler(data)
        if name is not None:
            model._derive(name=name)
        return model

    @model_validator(mode="after")
    def _with_ollama_layers(self, info: ValidationInfo) -> ModelConfig:
        # An Ollama model brings its params layer (options, stop words) and system layer; models.yaml wins.
        context = _file(info)
        if context is None or context.layers is None or not self.source.strip().startswith("ollama:"):
            return self
        options, system = context.layers(self.source)
        return self.model_copy(
            update={
                "options": {**options, **self.options},
                "system": self.system if self.system is not None else system,
            }
        )

    @property
    def name(self) -> str:
        """The model's key under `models`."""
        return self._name

    def renamed(self, name: str) -> ModelConfig:
        if name == self.name:
            return self
        model = self.model_copy()
        model._derive(name=name)
        return model

    def __repr_args__(self) -> Iterator[tuple[Optional[str], Any]]:
        yield "name", self.name
        yield from super().__repr_args__()


class Config(_Frozen):
    """models.yaml: the models this server serves, and how it serves them."""

    model_config = ConfigDict(title="models.yaml")

    _path: Optional[Path] = PrivateAttr(None)

    server: Annotated[ServerConfig, _empty_if_none(dict)] = Field(default_factory=ServerConfig)
    models: Annotated[Mapping[ModelName, Annotated[ModelConfig, _empty_if_none(dict)]], _empty_if_none(dict)] = Field(
        default_factory=dict
    )

    @model_validator(mode="wrap")
    @classmethod
    def _located(cls, data: Any, handler: ModelWrapValidatorHandler[Config], info: ValidationInfo) -> Config:
        data, path = _taken(data, info, "path")
        context = _file(info)
        if context is not None:
            path = context.path
            if isinstance(data, Mapping) and "server" not in data:
                data = {**data, "server": {}}  # validated here, with this context's memory, not a default_factory
        config = handler(data)
        if path is not None:
            config._derive(path=Path(path))
        return config

    @field_validator("models", mode="after")
    @classmethod
    def _named_by_key(cls, models: Mapping[str, ModelConfig]) -> Mapping[str, ModelConfig]:
        return ModelTable({key: model.renamed(key) for key, model in models.items()})

    @field_serializer("models", mode="wrap")
    def _models_as_dict(self, models: Mapping[str, ModelConfig], handler: SerializerFunctionWrapHandler) -> Any:
        return handler(dict(models))

    @property
    def path(self) -> Optional[Path]:
        """The file this config was read from (None when built in code)."""
        return self._path

    def attach_created(self, extra: Extra) -> None:
        """Serve the models `extra()` returns beside the file's (the registry of created models: ModelTable)."""
        self._table.attach(extra)

    def in_file(self, name: str) -> bool:
        """Whether `name` is a key under the file's `models` (not a created model)."""
        return self._table.configured(name)

    @property
    def _table(self) -> ModelTable:
        models = self.models
        if not isinstance(models, ModelTable):  # model_construct() skips the validator that builds it
            raise TypeError("this Config was built without validation: its models cannot take created ones")
        return models

    def keep_alive_for(self, name: str, requested: Optional[float] = None) -> float:
        """Ollama's order: the request's keep_alive, else the model's, else the server's."""
        if requested is not None:
            return requested
        model = self.models.get(name)
        return model.keep_alive if model is not None and model.keep_alive is not None else self.server.keep_alive

    def resolve(self, name: str) -> Optional[str]:
        """Exact name, then `x` ≡ `x:latest`, then aliases; the configured name or None."""
        if name in self.models:
            return name
        if name.endswith(":latest") and name[: -len(":latest")] in self.models:
            return name[: -len(":latest")]
        if f"{name}:latest" in self.models:
            return f"{name}:latest"
        base = name[: -len(":latest")] if name.endswith(":latest") else name
        for model in self.models.values():
            if base in model.aliases or name in model.aliases:
                return model.name
        return None

    def aliases(self) -> dict[str, str]:
        return {alias: m.name for m in self.models.values() for alias in m.aliases}

    def __repr_args__(self) -> Iterator[tuple[Optional[str], Any]]:
        yield from super().__repr_args__()
        yield "path", self.path
