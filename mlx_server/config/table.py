"""`Config.models`: the models.yaml table, plus the models created over the API, read live."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from mlx_server.config.tree import ModelConfig

Extra = Callable[[], Mapping[str, "ModelConfig"]]


class ModelTable(Mapping[str, "ModelConfig"]):
    """`Config.models`: the file's models, then the models created over the API (/api/create, /api/copy).

    The file's part never changes. The created part is read live from whatever the server attached (its registry
    of created models), so every holder of the config — the API, the catalog, the engine's stages — sees a model
    the moment it is created, without being handed a new config. A file name always wins over a created one.
    """

    def __init__(self, models: Mapping[str, ModelConfig]) -> None:
        self._file = dict(models)
        self._extra: Extra = dict

    def attach(self, extra: Extra) -> None:
        """Serve the models `extra()` returns as well (called once, by the server that owns the registry)."""
        self._extra = extra

    def configured(self, name: str) -> bool:
        """Whether `name` is a key in the file (such a model cannot be replaced by a created one)."""
        return name in self._file

    def __getitem__(self, name: str) -> ModelConfig:
        if name in self._file:
            return self._file[name]
        return self._extra()[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._file
        yield from (name for name in self._extra() if name not in self._file)

    def __len__(self) -> int:
        return len(self._file) + sum(1 for name in self._extra() if name not in self._file)

    def __repr__(self) -> str:
        return f"ModelTable({dict(self)!r})"


__all__ = ["Extra", "ModelTable"]
