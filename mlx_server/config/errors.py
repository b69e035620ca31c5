"""Config errors as an operator reads them: the file, the key path (`models.phi3:mini-4k.keep_alive`), what is allowed.

The CLI turns a ConfigError into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ValidationError

from mlx_server.config.tree import Config, ModelConfig, ServerConfig


class ConfigError(Exception):
    def __init__(self, path: Optional[Path], key: str, message: str) -> None:
        where = f"{path}" if path else "<config>"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path = path
        self.key = key


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


def _section(parent: Loc) -> Optional[type[BaseModel]]:
    if parent == ():
        return Config
    if parent == ("server",):
        return ServerConfig
    return ModelConfig if len(parent) == 2 and parent[0] == "models" else None


def describe_error(error: Any) -> str:
    """One pydantic error as a sentence that says what is allowed, in the terms models.yaml uses."""
    kind, loc, msg = error["type"], tuple(error["loc"]), str(error["msg"])
    section = _section(loc[:-1])
    if kind == "extra_forbidden" and section is not None:
        return f"unknown key (allowed: {', '.join(sorted(section.model_fields))})"
    if kind == "missing" and section is not None and loc[-1] in section.model_fields:
        return f"required ({section.model_fields[str(loc[-1])].description})"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    # Not pydantic's "instance of ServerConfig" or "valid tuple": the reader wrote YAML, not Python.
    if kind in ("model_type", "dict_type", "mapping_type"):
        msg = "expected a mapping"
    elif kind == "tuple_type":
        msg = "expected a list"
    value = error.get("input")
    return f"{msg[:1].lower()}{msg[1:]}, got {type(value).__name__} {value!r}"[:300]


def errors_of(exc: ValidationError) -> list[tuple[str, str]]:
    """(key path, message) for every error, in file order."""
    return [(key_path(tuple(e["loc"])), describe_error(e)) for e in exc.errors(include_url=False)]


def config_error(exc: ValidationError, path: Optional[Path]) -> ConfigError:
    """Every mistake at once in the message; the first one's key as .key."""
    (key, message), *more = errors_of(exc)
    also = "".join(f"\n  {k}: {m}" for k, m in more)
    return ConfigError(path, key, message + (f"\n  and also:{also}" if also else ""))
