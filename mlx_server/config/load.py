"""models.yaml + environment + CLI flags → the validated, immutable typed tree (mlx_server.config.tree).

Validation errors name the file and the key path (`models.phi3:mini-4k.keep_alive`) so an operator can fix the
file without reading code; the CLI turns them into exit status 2. The names most of the server imports (Config,
ConfigError, parse_duration, ...) are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml
from pydantic import ValidationError

from mlx_server.config.errors import ConfigError, config_error
from mlx_server.config.tree import (
    DEFAULT_PORT,
    PROMPT_LOOKUP,
    Config,
    FileContext,
    Layers,
    ModelConfig,
    ServerConfig,
    directory,
)
from mlx_server.config.units import parse_duration, parse_size

DEFAULT_CONFIG_NAME = "models.yaml"

# Every environment variable the config reads: MLX_SERVER_CONFIG picks the file, the others set `server` keys.
CONFIG_ENV = "MLX_SERVER_CONFIG"
SERVER_ENV: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "MLX_SERVER_HOST": ("host", str),
    "MLX_SERVER_PORT": ("port", int),
    "MLX_SERVER_API_KEY": ("api_key", str),
    "MLX_SERVER_CACHE_DIR": ("cache_dir", str),
    "OLLAMA_KV_CACHE_TYPE": ("kv_cache", str),  # Ollama's own variable, with its values (f16, q8_0, q4_0)
}


def with_overrides(raw: Any, path: Optional[Path], env: Mapping[str, str], cli: Mapping[str, Any]) -> Any:
    """The document with environment, then CLI, values put into its `server` section: the one place either applies.

    The file is the lowest layer, a flag the highest (a CLI value of None means "not given"). The result is a copy;
    a document whose shape is wrong comes back as it is, for validation to report.
    """
    doc = {} if raw is None else raw
    if not isinstance(doc, Mapping) or not (doc.get("server") is None or isinstance(doc["server"], Mapping)):
        return doc
    server = dict(doc.get("server") or {})
    for variable, (key, convert) in SERVER_ENV.items():
        if env.get(variable):
            try:
                server[key] = convert(env[variable])
            except ValueError as exc:
                raise ConfigError(path, variable, str(exc)) from None
    server.update({key: value for key, value in cli.items() if value is not None})
    return {**doc, "server": server}


def default_cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """The cache dir a config with no `server.cache_dir` gets, the environment applied: for callers that have no
    Config (the same rule as a loaded one, from the same table)."""
    server = with_overrides({}, None, os.environ if env is None else env, {})["server"]
    return Path(directory(server.get("cache_dir")))


def _check_names(config: Config, path: Optional[Path]) -> None:
    # Names and aliases share one namespace, and `x` is `x:latest`, as Ollama resolves them.
    seen: dict[str, str] = {}
    for name, model in config.models.items():
        for label in (name, *model.aliases):
            canon = label.removesuffix(":latest")
            if canon in seen:
                raise ConfigError(
                    path,
                    f"models.{name}" if label == name else f"models.{name}.aliases",
                    f"duplicate name or alias {label!r} (already used by {seen[canon]!r})",
                )
            seen[canon] = name
    default = config.server.default_model
    if default is not None and config.resolve(default) is None:
        raise ConfigError(path, "server.default_model", f"{default!r} is not a configured model or alias")
    for name, model in config.models.items():
        if model.draft is None or model.draft == PROMPT_LOOKUP:
            continue
        draft = config.resolve(model.draft)
        problem = (
            f"{model.draft!r} is not a configured model or alias (nor {PROMPT_LOOKUP})"
            if draft is None
            else "a model cannot be its own draft"
            if draft == name
            else f"its draft {draft!r} has a draft of its own"
            if config.models[draft].draft is not None
            else None
        )
        if problem is not None:
            raise ConfigError(path, f"models.{name}.draft", problem)


def build_config(
    raw: Any,
    path: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    total_memory: Optional[Callable[[], int]] = None,
    layers: Optional[Layers] = None,
) -> Config:
    """Validate a parsed YAML document, with env then CLI overrides on top of its `server` section.

    `total_memory` (default: physical RAM) sizes a percentage memory_budget; `layers` gives an `ollama:` source's
    default options and system prompt (the Ollama store's `defaults`; without it there are none).
    """
    doc = with_overrides(raw, path, os.environ if env is None else env, overrides or {})
    try:
        config = Config.model_validate(doc, context=FileContext(path, total_memory, layers))
    except ValidationError as exc:
        raise config_error(exc, path) from None
    _check_names(config, path)
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
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_config(
    path: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    layers: Optional[Layers] = None,
) -> Config:
    """Read and validate models.yaml (`path`, else $MLX_SERVER_CONFIG, else ./models.yaml); see build_config."""
    path = (path or default_config_path(env)).expanduser().resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"invalid YAML: {exc}") from None
    return build_config(raw, path=path, env=env, overrides=overrides, layers=layers)


__all__ = [
    "CONFIG_ENV",
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_PORT",
    "Layers",
    "ModelConfig",
    "SERVER_ENV",
    "ServerConfig",
    "build_config",
    "default_cache_dir",
    "default_config_path",
    "load_config",
    "parse_duration",
    "parse_size",
    "with_overrides",
]
