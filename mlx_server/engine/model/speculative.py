"""Speculative decoding inside the continuous batch: every decoding row drafts, one target pass verifies them all.

A row's state between steps is what mlx_lm's GenerationBatch keeps: its KV holds every token fed so far and its
next token is sampled but not yet fed. A speculative step drafts up to `num_draft` tokens after that pending
token, for each row (prompt lookup, or a greedy draft model), then runs the target once over
[pending, drafts...] for the whole batch (rows with fewer drafts are padded and their padding is rejected). Each
row accepts the longest prefix its own sampler agrees with and takes the target's token at the first
disagreement, so a step emits 1 + accepted tokens per row; the row's KV is then trimmed to what it emitted. Rows
trim by different amounts: the batch cache trims the least common amount, then rolls each row's remaining
rejected tail round to its front, where it becomes left padding the attention mask already hides.

Greedy rows accept a draft when it is the target's argmax, so their output is token for token the undrafted one.
Sampled rows use the speculative-sampling rule for a deterministic proposal (engine/model/sampling.py), so
their output keeps the target's distribution. Logits processors (penalties, grammar masks, logit bias) run on
every verified position, in order, with the drafted tokens before it as context, and only as far as the row
accepts: a stateful grammar consumes exactly the tokens the row keeps, and a token it masks has probability 0.

With a draft model the two models are stepped as one (`PairedModel`): each sequence's cache list is the target's
layers then the draft's, so prefill, the prompt cache and the batch's merge / filter / extract move both
together, and a plain (undrafted) step feeds both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from mlx_server.engine.model.kvquant import SequenceQuantizedKVCache
from mlx_server.engine.model.sampling import accept_draft, replace_draft

# Prompt lookup matches the last 3 tokens, else the last 2. A single token repeats by chance in any text, and a
# draft from it is mostly rejected: every drafted position costs verification, on a compute-bound backend in full.
MAX_NGRAM, MIN_NGRAM = 3, 2


def trimmable(model: Any) -> Optional[str]:
    """Why `model`'s caches cannot be trimmed row by row (None when they can): only plain KV layers can."""
    for i, c in enumerate(make_prompt_cache(model)):
        if type(c) not in (KVCache, SequenceQuantizedKVCache):
            return f"layer {i} uses {type(c).__name__}, which cannot drop rejected drafts per sequence"
    return None


def _kv_arrays(caches: Sequence[Any]) -> list[Any]:
    return [(c.keys, c.values) for c in caches if getattr(c, "keys", None) is not None]


class PairedModel:
    """A target and its draft model as one model: every forward feeds both (the draft's logits are dropped), so the
    draft's KV, the tail of each cache list, always holds the tokens the target's holds."""

    def __init__(self, target: Any, draft: Any) -> None:
        self.target = target
        self.draft = draft
        self.split = len(make_prompt_cache(target))

    @property
    def parts(self) -> tuple[Any, Any]:
        return self.target, self.draft

    @property
    def args(self) -> Any:
        return self.target.args

    @property
    def layers(self) -> list[Any]:
        return [*self.target.layers, *self.draft.layers]

    def make_cache(self) -> list[Any]:
        return make_prompt_cache(self.target) + make_prompt_cache(self.draft)

    def __call__(self, inputs: mx.array, cache: Optional[list[Any]] = None, **kwargs: Any) -> mx.array:
        if cache is None:
            return self.target(inputs, **kwargs)
        self.draft(inputs, cache=cache[self.split :])
        # Evaluated with the step, or a run of undrafted steps would leave the draft's KV a growing lazy graph.
        mx.async_eval(_kv_arrays(cache[self.split :]))
        return self.target(inputs, cache=cache[: self.split], **kwargs)


class Drafter(Protocol):
    def propose(self, batch: SpeculativeBatch, pending: list[int], counts: list[int]) -> list[list[int]]:
        """Up to counts[i] tokens to follow row i's pending token."""
        ...

    def settle(self, batch: SpeculativeBatch, grid: mx.array, kept: list[int], width: int) -> None:
        """After verification: rows keep kept[i] of the `width` tokens of `grid` fed this step."""
        ...


def _lookup(history: np.ndarray, count: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the history's last n tokens (n = 3, then 2)."""
    size = history.shape[0]
    for n in range(min(MAX_NGRAM, size - 1), MIN_NGRAM - 1, -1):
        tail = history[size - n :]
        windows = np.lib.stride_tricks.sliding_window_view(history[: size - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in history[start : start + count]]
    return []


class PromptLookup:
    """n-gram drafts from the sequence itself (prompt and output): free, and right whenever the answer quotes its
    input (code edits, RAG answers, JSON rewrites)."""

    def __init__(self) -> None:
        # Each row's tokens as an array, extended as the row grows: a long prompt is not converted every step.
        self._seen: dict[int, np.ndarray] = {}

    def _history(self, uid: int, tokens: list[int]) -> np.ndarray:
        known = self._seen.get(uid)
        if known is None or known.shape[0] > len(tokens):
            known = np.asarray(tokens, dtype=np.int64)
        elif known.shape[0] < len(tokens):
            known = np.concatenate([known, np.asarray(tokens[known.shape[0] :], dtype=np.int64)])
        self._seen[uid] = known
        return known

    def propose(self, batch: SpeculativeBatch, pending: list[int], counts: list[int]) -> list[list[int]]:
        out: list[list[int]] = []
        for uid, tokens, token, count in zip(batch.uids, batch.tokens, pending, counts, strict=True):
            if count <= 0:
                out.append([])
                continue
            out.append(_lookup(np.append(self._history(uid, tokens), token), count))
        for gone in self._seen.keys() - set(batch.uids):
            del self._seen[gone]
        return out

    def settle(self, batch: SpeculativeBatch, grid: mx.array, kept: list[int], width: int) -> None:
        trim_rows(batch.prompt_cache, [width - k for k in kept])


class DraftModel:
    """Greedy drafts from a small model with the target's vocabulary, batched over every row."""

    def __init__(self, paired: PairedModel, vocab: int) -> None:
        self.paired = paired
        self.vocab = vocab  # the target's logit width: a draft row past it is padding, never a token

    def propose(self, batch: SpeculativeBatch, pending: list[int], counts: list[int]) -> list[list[int]]:
        caches = batch.prompt_cache[self.paired.split :]
        y = mx.array(pending, dtype=mx.uint32)[:, None]
        steps = []
        for _ in range(max(counts)):
            logits = self.paired.draft(y, cache=caches)[:, -1, : self.vocab]
            y = mx.argmax(logits, axis=-1).astype(mx.uint32)[:, None]
            steps.append(y)
        drafted: list[list[int]] = mx.concatenate(steps, axis=1).tolist()  # type: ignore[assignment]
        return [row[:count] for row, count in zip(drafted, counts, strict=True)]

    def settle(self, batch: SpeculativeBatch, grid: mx.array, kept: list[int], width: int) -> None:
        split = self.paired.split
        trims = [width - k for k in kept]
        trim_rows(batch.prompt_cache[:split], trims)
        drafts = batch.prompt_cache[split:]
        # The draft fed the pending token and all drafts but the last; a row that kept everything needs that last.
        if max(kept) == width:
            self.paired.draft(grid[:, -1:], cache=drafts)
            trim_rows(drafts, trims)
        else:
            trim_rows(drafts, [t - 1 for t in trims])


def trim_rows(caches: Sequence[Any], counts: list[int]) -> None:
    """Drop the last counts[i] tokens of row i from every batch cache layer."""
    least = min(counts)
    extra = [c - least for c in counts]
    for c in caches:
        if least:
            c.trim(least)
        if any(extra):
            c.prepare(right_padding=extra)
            c.finalize()
    if caches:
        mx.eval(_kv_arrays(caches))


@dataclass
class Speculation:
    """What a model's batch drafts with, and the runner's hooks: each row's draft length (by BatchGenerator uid)
    and where to count drafted / accepted tokens.

    A row whose drafts were all rejected PROBE_AFTER rounds running drafts one token until one is accepted again:
    every drafted position costs the target a position of verification (on a compute-bound backend in full), so a
    row whose text does not follow its drafts (free chat under prompt lookup) stops paying for num_draft of them."""

    drafter: Drafter
    verify: Callable[[mx.array, list[Any]], mx.array]  # the target's forward over (tokens, the batch's caches)
    num_draft: Callable[[int], int]
    record: Callable[[int, int, int], None]  # (uid, drafted, accepted)
    misses: dict[int, int] = field(default_factory=dict)  # uid → rounds running whose drafts were all rejected

    PROBE_AFTER = 2

    def budget(self, uid: int) -> int:
        wanted = self.num_draft(uid)
        return min(wanted, 1) if self.misses.get(uid, 0) >= self.PROBE_AFTER else wanted

    def judged(self, uids: list[int], drafted: list[int], accepted: list[int]) -> None:
        for gone in self.misses.keys() - set(uids):
            del self.misses[gone]
        for uid, d, a in zip(uids, drafted, accepted, strict=True):
            if d:
                self.misses[uid] = 0 if a else self.misses.get(uid, 0) + 1
            self.record(uid, d, a)


@dataclass
class Verdict:
    accepted: int
    token: int  # the row's next pending token: the target's at the first rejection, or the one after all drafts
    logprobs: list[mx.array]  # the target's distribution at each verified position, up to and including `token`'s


class SpeculativeBatch(GenerationBatch):
    """mlx_lm's GenerationBatch, whose `next` drafts and verifies when any row drafts (a plain step otherwise).
    Built empty by BatchGenerator's rules, then given its `speculation`; rows join through the usual extend."""

    speculation: Optional[Speculation] = None

    def next(self) -> list[GenerationBatch.Response]:
        spec = self.speculation
        if not self.uids or spec is None:
            return super().next()
        counts = [spec.budget(uid) for uid in self.uids]
        if not any(counts):
            return super().next()
        assert self._next_tokens is not None
        pending: list[int] = self._next_tokens.tolist()  # type: ignore[assignment]
        drafts = spec.drafter.propose(self, pending, counts)
        width = 1 + max(len(d) for d in drafts)
        if width == 1:
            return super().next()
        rows = [[p, *d, *([p] * (width - 1 - len(d)))] for p, d in zip(pending, drafts, strict=True)]
        grid = mx.array(rows, dtype=mx.uint32)
        logits = spec.verify(grid, self.prompt_cache).astype(mx.float32)
        top: list[list[int]] = mx.argmax(logits, axis=-1).tolist()  # type: ignore[assignment]
        verdicts = [self._verify(i, logits[i], top[i], pending[i], drafts[i]) for i in range(len(self.uids))]
        return self._emit(spec, grid, width, pending, drafts, verdicts)

    def _verify(self, i: int, logits: mx.array, top: list[int], pending: int, draft: list[int]) -> Verdict:
        sampler = self.samplers[i] if self.samplers else self.fallback_sampler
        processors = self.logits_processors[i] if self.logits_processors else []
        if not processors and sampler is greedy_sampler:
            accepted = 0
            while accepted < len(draft) and top[accepted] == draft[accepted]:
                accepted += 1
            lps = logits[: accepted + 1]
            lps = lps - mx.logsumexp(lps, axis=-1, keepdims=True)
            return Verdict(accepted, top[accepted], [lps[j] for j in range(accepted + 1)])
        history = [*self.tokens[i], pending]
        seen: list[mx.array] = []
        for j in range(len(draft) + 1):
            row = logits[j : j + 1]
            if processors:
                context = mx.array(history + draft[:j], dtype=mx.int32)
                for processor in processors:
                    row = processor(context, row)
            lp = row - mx.logsumexp(row, axis=-1, keepdims=True)
            seen.append(lp[0])
            if j == len(draft):
                return Verdict(j, int(sampler(lp).item()), seen)  # type: ignore[arg-type]
            if not accept_draft(sampler, lp, draft[j]):
                return Verdict(j, replace_draft(sampler, lp, draft[j]), seen)
        raise AssertionError("unreachable: the last position always returns")

    def _emit(
        self,
        spec: Speculation,
        grid: mx.array,
        width: int,
        pending: list[int],
        drafts: list[list[int]],
        verdicts: list[Verdict],
    ) -> list[GenerationBatch.Response]:
        rows: list[tuple[list[int], list[mx.array], Optional[str]]] = []
        for i, (token, draft, v) in enumerate(zip(pending, drafts, verdicts, strict=True)):
            emitted = [token, *draft[: v.accepted]]
            lps = [self._next_logprobs[i], *v.logprobs[: v.accepted]]
            finish: Optional[str] = None
            for n, t in enumerate(emitted, 1):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(t):
                    finish = "stop"
                if finish is not None:
                    emitted, lps = emitted[:n], lps[:n]
                    break
            rows.append((emitted, lps, finish))
        # A row that finished part-way counts only the drafts it emitted: those past its end were never judged.
        cut = [len(e) - 1 < v.accepted for (e, _, _), v in zip(rows, verdicts, strict=True)]
        spec.judged(
            self.uids,
            [len(e) - 1 if c else len(d) for (e, _, _), d, c in zip(rows, drafts, cut, strict=True)],
            [len(e) - 1 if c else v.accepted for (e, _, _), v, c in zip(rows, verdicts, cut, strict=True)],
        )
        spec.drafter.settle(self, grid, [len(e) for e, _, _ in rows], width)

        responses: list[GenerationBatch.Response] = []
        keep: list[int] = []
        for i, (emitted, lps, finish) in enumerate(rows):
            self.tokens[i].extend(emitted)
            if self.logits_processors and self.logits_processors[i]:
                self._token_context[i].update_and_fetch(mx.array(emitted, dtype=mx.int32))
            if finish is None:
                keep.append(i)
            for n, (t, lp) in enumerate(zip(emitted, lps, strict=True), 1):
                last = finish is not None and n == len(emitted)
                responses.append(
                    self.Response(
                        uid=self.uids[i],
                        token=t,
                        logprobs=lp,
                        finish_reason=finish if last else None,
                        prompt_cache=self.extract_cache(i) if last else None,
                        all_tokens=self.tokens[i] if last else None,
                    )
                )
        self._next_tokens = mx.array([v.token for v in verdicts], dtype=mx.uint32)
        self._next_logprobs = [v.logprobs[v.accepted] for v in verdicts]
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


@dataclass(frozen=True)
class Drafting:
    """How a model drafts: with a draft model (stepped with it as a PairedModel) or by prompt lookup."""

    num_draft: int  # per step, unless a request says (Ollama's draft_num_predict)
    paired: bool  # the worker's model is a PairedModel
    vocab: int = 0  # the target's logit width

    def speculation(
        self, model: Any, num_draft: Callable[[int], int], record: Callable[[int, int, int], None]
    ) -> Speculation:
        if self.paired:
            assert isinstance(model, PairedModel)
            split, target = model.split, model.target

            def verify(grid: mx.array, caches: list[Any]) -> mx.array:
                return target(grid, cache=caches[:split])

            return Speculation(DraftModel(model, self.vocab), verify, num_draft, record)
        return Speculation(PromptLookup(), lambda grid, caches: model(grid, cache=caches), num_draft, record)


def install(generator: Any, speculation: Speculation) -> None:
    """Make `generator` (a fresh BatchGenerator) decode through a SpeculativeBatch."""
    batch = SpeculativeBatch.empty(generator.model, generator.sampler)
    batch.speculation = speculation
    generator._generation_batch = batch


__all__ = [
    "DraftModel",
    "Drafting",
    "PairedModel",
    "PromptLookup",
    "SpeculativeBatch",
    "Speculation",
    "install",
    "trim_rows",
    "trimmable",
]
