"""The stored prompt caches of one model: mlx_lm's LRU prompt cache, with sessions a client names.

Entries are keyed by token prefix; a prompt with images is keyed by its tokens with the images salted in (its
`key`), so an image-aware prefix only matches the same images.

A session (OpenAI's `prompt_cache_key`, which Codex sets per conversation) keeps one entry, its latest. An agent
loop's next prompt re-renders the previous reply, which rarely matches the tokens the model generated, so each
turn would otherwise leave an entry of nearly the whole context behind, and a few sessions' stale turns would push
other sessions' prefixes out. The next turn has fetched its prefix before its own entry replaces the old one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# Sessions remembered per model; one forgotten only loses the pruning of its stale entry, which LRU then ages out.
MAX_SESSIONS = 1024


class SessionPromptCache(LRUPromptCache):
    def __init__(self, max_bytes: int, max_sessions: int = MAX_SESSIONS) -> None:
        super().__init__(max_size=1 << 30, max_bytes=max_bytes)
        self.max_sessions = max_sessions
        self._latest: OrderedDict[tuple[str, str], list[int]] = OrderedDict()  # (model, session) → its entry

    def nearest(
        self, model: str, tokens: list[int], key: Optional[list[int]] = None
    ) -> tuple[Optional[list[Any]], int]:
        """A private copy of the longest cached prefix of `tokens` and how many tokens it holds (None, 0 when none
        is): never the whole prompt, since its last token must go through the model to give the next logits."""
        cache, rest = self.fetch_nearest_cache(model, key if key is not None else tokens)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return (cache, len(tokens) - len(rest)) if cache is not None else (None, 0)

    def keep(
        self,
        model: str,
        tokens: list[int],
        cache: list[Any],
        key: Optional[list[int]],
        session: Optional[str],
        room: int,
    ) -> None:
        """Store a sequence's KV for later prompts that share its prefix, then hold everything to `room` bytes."""
        if key is not None:
            tokens = key[: len(tokens)] + tokens[len(key) :]  # images stay part of what the cache matches
        # Extracted caches are lazy slices of the whole batch's KV buffers; left unevaluated, each stored
        # entry would keep those buffers alive (measured: 12x its counted bytes). Materialize it now.
        mx.eval([c.state for c in cache])
        self.store(model, tokens, cache, session)
        self.trim_to(n_bytes=max(0, room))

    def store(self, model: str, tokens: list[int], cache: list[Any], session: Optional[str] = None) -> None:
        self.insert_cache(model, tokens, cache)
        if session is None:
            return
        old = self._latest.pop((model, session), None)
        if old is not None and old != tokens[: len(old)]:  # an old entry that is a prefix went in insert_cache
            self._drop(model, old)
        self._latest[(model, session)] = tokens
        while len(self._latest) > self.max_sessions:
            self._latest.popitem(last=False)

    def entries(self) -> int:
        return len(self._lru)

    def _drop(self, model: str, tokens: list[int]) -> None:
        try:
            entry = self._trie.get(model, tokens)
        except KeyError:
            return  # evicted meanwhile
        self._trie.pop(model, tokens)
        self._lru.remove(model, tokens)
        self._n_bytes -= entry.nbytes
        self._n_bytes_by_type[entry.cache_type] -= entry.nbytes


__all__ = ["MAX_SESSIONS", "SessionPromptCache"]
