"""models.yaml + environment + CLI flags → one validated, typed, immutable config tree.

Validation errors name the file and the key path (`models.phi3:mini-4k.keep_alive`) so an operator can fix the
file without reading code; the CLI turns them into exit status 2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

import yaml

DEFAULT_PORT = 11435
DEFAULT_CONFIG_NAME = "models.yaml"

T = TypeVar("T")


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


# ---- validation ---------------------------------------------------------------------------------------------


class _Validator:
    def __init__(self, path: Optional[Path]) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, key, message)

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def known_keys(self, value: Mapping[str, Any], key: str, allowed: set[str]) -> None:
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else str(k), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def typed(self, value: Any, key: str, kind: type, allow_none: bool = False) -> Any:
        if value is None and allow_none:
            return None
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise self.fail(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def convert(self, value: Any, key: str, fn: Callable[[Any], T]) -> T:
        try:
            return fn(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None


_SERVER_KEYS = {f for f in ServerConfig.__dataclass_fields__} - {"memory_budget_spec"}
_MODEL_KEYS = {"source", "aliases", "preload", "keep_alive", "context_length", "options", "priority"}


def _physical_memory() -> int:
    import psutil  # deferred: only needed when a percentage is used

    return int(psutil.virtual_memory().total)


def build_config(raw: Any, path: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                 overrides: Optional[Mapping[str, Any]] = None,
                 total_memory: Optional[Callable[[], int]] = None) -> Config:
    """Validate a parsed YAML document; env then CLI overrides are applied on top of the file's `server` section."""
    v = _Validator(path)
    doc = v.mapping(raw, "")
    v.known_keys(doc, "", {"server", "models"})
    server_raw = dict(v.mapping(doc.get("server"), "server"))
    v.known_keys(server_raw, "server", _SERVER_KEYS)
    env = os.environ if env is None else env
    for env_key, cfg_key, conv in (("MLX_SERVER_HOST", "host", str), ("MLX_SERVER_PORT", "port", int),
                                    ("MLX_SERVER_API_KEY", "api_key", str),
                                    ("MLX_SERVER_CACHE_DIR", "cache_dir", str)):
        if env.get(env_key):
            server_raw[cfg_key] = v.convert(env[env_key], env_key, conv)
    for k, val in (overrides or {}).items():
        if val is not None:
            server_raw[k] = val

    s: dict[str, Any] = {}
    for k in ("host", "default_model", "fallback_url", "api_key", "log_format"):
        if k in server_raw:
            s[k] = v.typed(server_raw[k], f"server.{k}", str, allow_none=True)
    for k in ("port", "max_loaded_models", "max_queue", "max_concurrent", "rate_limit_per_minute"):
        if k in server_raw:
            s[k] = v.typed(server_raw[k], f"server.{k}", int, allow_none=(k == "rate_limit_per_minute"))
            if s[k] is not None and s[k] < (0 if k == "max_queue" else 1):
                raise v.fail(f"server.{k}", f"must be positive, got {s[k]}")
    if "port" in s and not 0 <= s["port"] <= 65535:
        raise v.fail("server.port", f"not a port number: {s['port']}")
    for k in ("keep_alive",):
        if k in server_raw:
            s[k] = v.convert(server_raw[k], f"server.{k}", parse_duration)
    for k in ("request_timeout", "shutdown_grace"):
        if k in server_raw and server_raw[k] is not None:
            s[k] = v.convert(server_raw[k], f"server.{k}", parse_duration)
            if s[k] < 0:
                raise v.fail(f"server.{k}", "must not be negative")
    for k in ("prompt_cache_bytes", "max_body_bytes"):
        if k in server_raw:
            s[k] = v.convert(server_raw[k], f"server.{k}", parse_size)
    if "fallback_when_busy" in server_raw:
        s["fallback_when_busy"] = v.typed(server_raw["fallback_when_busy"], "server.fallback_when_busy", bool)
    for k in ("allowed_hosts", "origins"):
        if k in server_raw:
            items = v.typed(server_raw[k], f"server.{k}", list)
            s[k] = tuple(v.typed(x, f"server.{k}[{i}]", str) for i, x in enumerate(items))
    if "cache_dir" in server_raw:
        s["cache_dir"] = Path(v.typed(server_raw["cache_dir"], "server.cache_dir", str)).expanduser()
    if s.get("log_format", "text") not in ("text", "json"):
        raise v.fail("server.log_format", "must be 'text' or 'json'")
    spec = server_raw.get("memory_budget", "75%")
    s["memory_budget_spec"] = str(spec)
    s["memory_budget"] = v.convert(spec, "server.memory_budget",
                                   lambda x: parse_size(x, (total_memory or _physical_memory)()
                                                        if isinstance(x, str) and x.strip().endswith("%") else None))
    server = ServerConfig(**s)

    models: dict[str, ModelConfig] = {}
    seen: dict[str, str] = {}
    models_raw = v.mapping(doc.get("models"), "models")
    for name, body in models_raw.items():
        key = f"models.{name}"
        if not isinstance(name, str) or not name.strip():
            raise v.fail(key, "model names must be non-empty strings")
        body = v.mapping(body, key)
        v.known_keys(body, key, _MODEL_KEYS)
        if "source" not in body:
            raise v.fail(f"{key}.source", "required (HF repo id, local dir, .gguf path, or package:MODULE/FILE)")
        source = v.typed(body["source"], f"{key}.source", str)
        aliases = tuple(v.typed(a, f"{key}.aliases[{i}]", str)
                        for i, a in enumerate(v.typed(body.get("aliases", []) or [], f"{key}.aliases", list)))
        for label in (name, *aliases):
            canon = label[: -len(":latest")] if label.endswith(":latest") else label
            if canon in seen:
                raise v.fail(key if label == name else f"{key}.aliases",
                             f"duplicate name or alias {label!r} (already used by {seen[canon]!r})")
            seen[canon] = name
        keep_alive = (v.convert(body["keep_alive"], f"{key}.keep_alive", parse_duration)
                      if body.get("keep_alive") is not None else None)
        ctx = v.typed(body.get("context_length"), f"{key}.context_length", int, allow_none=True)
        if ctx is not None and ctx < 1:
            raise v.fail(f"{key}.context_length", "must be positive")
        options = dict(v.mapping(body.get("options"), f"{key}.options"))
        models[name] = ModelConfig(
            name=name, source=source, aliases=aliases,
            preload=v.typed(body.get("preload", False), f"{key}.preload", bool),
            keep_alive=keep_alive, context_length=ctx, options=options,
            priority=v.typed(body.get("priority", 100), f"{key}.priority", int))
    config = Config(server=server, models=models, path=path)
    if server.default_model is not None and config.resolve(server.default_model) is None:
        raise v.fail("server.default_model", f"{server.default_model!r} is not a configured model or alias")
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
