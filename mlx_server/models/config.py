"""models.yaml as the entry points load it: each `ollama:` source with its Ollama layers merged in.

mlx_server.config sits below this package, so it cannot read the Ollama store itself; it takes the layers as a hook,
and this is where the real one is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from mlx_server.config import load
from mlx_server.config.load import Config
from mlx_server.models.ollama_store import defaults


def load_config(
    path: Optional[Path] = None, env: Optional[Mapping[str, str]] = None, overrides: Optional[Mapping[str, Any]] = None
) -> Config:
    """mlx_server.config.load.load_config with the Ollama store's params and system layers."""
    return load.load_config(path, env=env, overrides=overrides, layers=defaults)
