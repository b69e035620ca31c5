"""models.yaml + environment + CLI flags → one validated, typed, immutable config tree.

Validation errors name the file and the key path (`models.phi3:mini-4k.keep_alive`) so an operator can fix the
file without reading code; the CLI turns them into exit status 2. The file's shape, as pydantic models (and the
JSON Schema in docs/models.schema.json), is in mlx_server/config/schema.py; this module holds the typed tree.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

DEFAULT_PORT = 11435
DEFAULT_CONFIG_NAME = "models.yaml"


class ConfigError(Exception):
    def __init__(self, path: Optional[Path], key: str, message: str) -> None:
        where = f"{path}" if path else "<config>"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path = path
        self.key = key


# ---- scalar parsers (shared with the dialects, which accept the same spellings per request) -------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from an Ollama keep_alive: a number (seconds) or a Go duration ("5m", "1h30m", "-1s").

    Negative means forever and is returned as -1.0 so callers need only one test.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # "300" is seconds, as Ollama accepts it
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION_PART.finditer(body):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos != len(body) or not body:
                raise ValueError(f"invalid duration {value!r} (use e.g. 300, \"5m\", \"1h30m\", -1)") from None
            seconds *= sign
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {value!r}")
    return -1.0 if seconds < 0 else seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any, total: Optional[int] = None) -> int:
    """Bytes from 96GB / 512MiB / 1073741824, or a percentage of `total` ("75%")."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("size must not be negative")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {type(value).__name__}")
    text = value.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"invalid percentage {value!r}") from None
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100], got {value!r}")
        if total is None:
            raise ValueError("a percentage needs a total")
        return int(total * pct / 100)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {value!r} (use e.g. 96GB, 512MiB, 75%)")
    unit = (match.group(2) or "").lower().rstrip("b") if (match.group(2) or "").lower() != "b" else ""
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


# ---- the typed tree -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str
    aliases: tuple[str, ...] = ()
    preload: bool = False
    keep_alive: Optional[float] = None  # None = server default
    context_length: Optional[int] = None  # None = what the model's config.json says
    options: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 100  # preload / warm order; lower first
    kind: Optional[str] = None  # "embedding" or "generation"; None = inferred from the model's files
    system: Optional[str] = None  # default system prompt, for requests that send none
    parallel: str = "auto"  # serve --distributed: "auto", "tensor" or "pipeline"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    memory_budget: int = 0  # bytes, resolved from a size or percentage
    memory_budget_spec: str = "75%"
    max_loaded_models: int = 3
    keep_alive: float = 300.0
    default_model: Optional[str] = None
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "mlx-server")
    max_queue: int = 256
    max_concurrent: int = 16
    prompt_cache_bytes: int = 2 * 2**30
    prefill_slice: float = 0.05  # seconds of prompt prefill between decode steps; 0 = whole prompts (as mlx_lm)
    prefill_chunk: int = 2048  # most prompt tokens per forward pass: bounds activation memory
    request_timeout: Optional[float] = None
    shutdown_grace: float = 10.0
    fallback_url: Optional[str] = None
    fallback_when_busy: bool = False
    api_key: Optional[str] = None
    allowed_hosts: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 2**20
    rate_limit_per_minute: Optional[int] = None
    log_format: str = "text"


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    models: Mapping[str, ModelConfig]
    path: Optional[Path] = None

    def keep_alive_for(self, name: str) -> float:
        """The model's keep_alive, else the server's (a request's own keep_alive comes first, in the engine)."""
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


# ---- validation (the file's shape lives in mlx_server.config.schema) ------------------------------------------

_ENV = (("MLX_SERVER_HOST", "host", str), ("MLX_SERVER_PORT", "port", int), ("MLX_SERVER_API_KEY", "api_key", str),
        ("MLX_SERVER_CACHE_DIR", "cache_dir", str))


def _physical_memory() -> int:
    import psutil  # deferred: only needed when a percentage is used

    return int(psutil.virtual_memory().total)


def _with_overrides(raw: Any, path: Optional[Path], env: Mapping[str, str],
                    overrides: Mapping[str, Any]) -> Any:
    """The document with env, then CLI, values put into its `server` section (a copy; the caller's is untouched).

    A document whose shape is wrong is returned as it is, for the schema to report.
    """
    doc = {} if raw is None else raw
    if not isinstance(doc, Mapping) or not (doc.get("server") is None or isinstance(doc["server"], Mapping)):
        return doc
    server = dict(doc.get("server") or {})
    for env_key, cfg_key, convert in _ENV:
        if env.get(env_key):
            try:
                server[cfg_key] = convert(env[env_key])
            except ValueError as exc:
                raise ConfigError(path, env_key, str(exc)) from None
    server.update({k: v for k, v in overrides.items() if v is not None})
    return {**doc, "server": server}


def _check_names(models: Mapping[str, ModelConfig], path: Optional[Path]) -> None:
    # Names and aliases share one namespace, and `x` is `x:latest`, as Ollama resolves them.
    seen: dict[str, str] = {}
    for name, model in models.items():
        for label in (name, *model.aliases):
            canon = label.removesuffix(":latest")
            if canon in seen:
                raise ConfigError(path, f"models.{name}" if label == name else f"models.{name}.aliases",
                                  f"duplicate name or alias {label!r} (already used by {seen[canon]!r})")
            seen[canon] = name


def _model_config(name: str, m: Any) -> ModelConfig:
    options, system = dict(m.options), m.system
    if m.source.strip().startswith("ollama:"):
        # An Ollama model brings its params layer (options, stop words) and system layer; models.yaml wins.
        from mlx_server.models.ollama_store import defaults

        layer_options, layer_system = defaults(m.source)
        options = {**layer_options, **options}
        system = system if system is not None else layer_system
    return ModelConfig(name=name, source=m.source, aliases=tuple(m.aliases), preload=m.preload,
                       keep_alive=m.keep_alive, context_length=m.context_length, options=options,
                       priority=m.priority, kind=m.kind, system=system, parallel=m.parallel)


def build_config(raw: Any, path: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                 overrides: Optional[Mapping[str, Any]] = None,
                 total_memory: Optional[Callable[[], int]] = None) -> Config:
    """Validate a parsed YAML document; env then CLI overrides are applied on top of the file's `server` section."""
    from pydantic import ValidationError  # deferred with the schema: it imports this module for the typed tree

    from mlx_server.config.schema import ModelsFile, errors_of

    doc = _with_overrides(raw, path, os.environ if env is None else env, overrides or {})
    try:
        checked = ModelsFile.model_validate(doc)
    except ValidationError as exc:
        (key, message), *more = errors_of(exc)
        also = "".join(f"\n  {k}: {m}" for k, m in more)  # every mistake at once, the first one as .key
        raise ConfigError(path, key, message + (f"\n  and also:{also}" if also else "")) from None
    s = checked.server
    spec = s.memory_budget
    percent = isinstance(spec, str) and spec.strip().endswith("%")
    server = ServerConfig(
        **s.model_dump(exclude={"memory_budget", "cache_dir", "allowed_hosts", "origins"}),
        memory_budget=parse_size(spec, (total_memory or _physical_memory)() if percent else None),
        memory_budget_spec=str(spec), allowed_hosts=tuple(s.allowed_hosts), origins=tuple(s.origins),
        **({"cache_dir": Path(s.cache_dir).expanduser()} if s.cache_dir is not None else {}))
    models = {name: _model_config(name, m) for name, m in checked.models.items()}
    _check_names(models, path)
    config = Config(server=server, models=models, path=path)
    if server.default_model is not None and config.resolve(server.default_model) is None:
        raise ConfigError(path, "server.default_model",
                          f"{server.default_model!r} is not a configured model or alias")
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a duplicated model name must be an error instead."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def default_config_path(env: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if env is None else env
    if env.get("MLX_SERVER_CONFIG"):
        return Path(env["MLX_SERVER_CONFIG"]).expanduser()
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_config(path: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                overrides: Optional[Mapping[str, Any]] = None) -> Config:
    path = (path or default_config_path(env)).expanduser().resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"invalid YAML: {exc}") from None
    return build_config(raw, path=path, env=env, overrides=overrides)
