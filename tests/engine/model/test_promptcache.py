"""SessionPromptCache: a named session keeps one stored entry, its latest; other entries are mlx_lm's LRU's."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlx_server.engine.model.promptcache import SessionPromptCache


def kv(n: int) -> list[Any]:
    cache = KVCache()
    cache.update_and_fetch(mx.ones((1, 2, n, 8)), mx.ones((1, 2, n, 8)))
    return [cache]


def test_a_session_keeps_only_its_latest_entry() -> None:
    store = SessionPromptCache(max_bytes=1 << 30)
    store.store("m", [1, 2, 3, 4], kv(4), "s")
    store.store("m", [1, 2, 3, 9, 9], kv(5), "s")  # the next turn re-rendered the reply: not a continuation
    assert store.entries() == 1
    assert store.nbytes == kv(5)[0].nbytes
    cache, rest = store.fetch_nearest_cache("m", [1, 2, 3, 4])
    assert cache is not None and rest == [4]  # what is left comes from the new entry
    store.store("m", [1, 2, 3, 9, 9, 7], kv(6), "s")  # a continuation: mlx_lm's insert drops the prefix itself
    assert store.entries() == 1 and store.nbytes == kv(6)[0].nbytes


def test_sessions_and_unnamed_prompts_keep_their_own() -> None:
    store = SessionPromptCache(max_bytes=1 << 30)
    store.store("m", [1, 2, 3, 4], kv(4))
    store.store("m", [1, 2, 3, 9, 9], kv(5))
    assert store.entries() == 2  # no session: both stay, as in mlx_lm
    store.store("m", [5, 6, 7], kv(3), "a")
    store.store("m", [8, 6, 7], kv(3), "b")
    store.store("other", [5, 6, 8], kv(3), "a")  # the same name on another model is another session
    assert store.entries() == 5


def test_a_session_whose_entry_was_evicted_stores_again() -> None:
    store = SessionPromptCache(max_bytes=1 << 30, max_sessions=1)
    store.store("m", [1, 2, 3], kv(3), "s")
    store.trim_to(n_bytes=0)
    store.store("m", [1, 2, 4], kv(3), "s")
    assert store.entries() == 1
    store.store("m", [7, 7], kv(2), "t")  # "s" is forgotten (max_sessions): its entry then ages out as LRU's
    store.store("m", [1, 2, 5], kv(3), "s")
    assert store.entries() == 3
