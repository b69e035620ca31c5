"""Loads, unloads and token counts: requests that need no worker of a model.

A load makes its model resident (Ollama's empty /api/generate); an unload lets it go once idle (keep_alive 0);
a count renders and tokenizes a generation without ever loading a model (Anthropic's count_tokens)."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_server.contract.events import Done, Started, Usage
from mlx_server.contract.requests import CountTokensRequest, LoadRequest, UnloadRequest
from mlx_server.engine.kinds.base import Kind, Reply, age
from mlx_server.engine.loop.jobs import Admitting, Outcome
from mlx_server.engine.prepare.stage import Preparer


@dataclass(frozen=True)
class LoadJob:
    request: LoadRequest

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        name, request_id = self.request.model, self.request.request_id
        got = loop.pool.request(name)
        if isinstance(got, str):
            return "blocked" if got == "blocked" else "parked"
        loop.pool.set_keep_alive(name, loop.keep_alive(name, self.request.keep_alive))
        loop.end(
            request_id,
            Done(request_id, name, "load", Usage(load_duration=load_seconds, total_duration=age(self.request))),
        )
        return "started"

    def wire(self) -> LoadJob:
        return self

    def for_rank(self, preparer: Preparer) -> LoadJob:
        return self


@dataclass(frozen=True)
class UnloadJob:
    request: UnloadRequest

    def admit(self, loop: Admitting, load_seconds: float) -> Outcome:
        name, request_id = self.request.model, self.request.request_id
        if loop.pool.get(name) is not None:
            loop.pool.set_keep_alive(name, 0)  # now if idle, else as soon as its requests finish
        loop.end(request_id, Done(request_id, name, "unload", Usage(total_duration=age(self.request))))
        return "started"

    def wire(self) -> UnloadJob:
        return self

    def for_rank(self, preparer: Preparer) -> UnloadJob:
        return self


def prepare_load(preparer: Preparer, request: LoadRequest) -> LoadJob:
    preparer.files(request.model)  # found (a GGUF imported) here, so the load itself only reads weights
    return LoadJob(request)


def prepare_unload(preparer: Preparer, request: UnloadRequest) -> UnloadJob:
    return UnloadJob(request)


def count(preparer: Preparer, request: CountTokensRequest) -> Reply:
    tokens = preparer.count(request.request)
    return Reply(
        (
            Started(request.request_id, request.model, tokens, 0, 0.0),
            Done(request.request_id, request.model, "stop", Usage(prompt_tokens=tokens, total_duration=age(request))),
        )
    )


LOAD = Kind("load", (LoadRequest,), prepare_load)
UNLOAD = Kind("unload", (UnloadRequest,), prepare_unload, inline=True)
COUNT = Kind("count", (CountTokensRequest,), count)

__all__ = ["COUNT", "LOAD", "LoadJob", "UNLOAD", "UnloadJob"]
