"""Speculative decoding's parts on real MLX (engine/model/speculative.py): per-row KV trimming on both batch
caches, prompt lookup's n-gram drafts, and the sampled output's distribution with drafting on.

The distribution test samples the first two tokens of one prompt under many seeds through a real BatchGenerator
whose batch drafts with an identical draft model (so the draft is always the target's most likely token, the
case a wrong acceptance rule skews most), and compares the counts with the exact joint distribution computed
from the target's own logits with the same filters and temperature: Pearson's chi-square test must not reject
it at the 0.1% level (seeds are fixed, so the outcome is reproducible; a correct implementation fails for 1 in
1,000 seed sets). The same counts must reject, at that level, the distribution of a common wrong rule (on
rejection, drawing from the target's full distribution instead of the residual), so the test has power.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, KVCache
from scipy.stats import chisquare

from mlx_server.contract.requests import SamplingParams
from mlx_server.engine.model.kvquant import BatchQuantizedKVCache, SequenceQuantizedKVCache
from mlx_server.engine.model.sampling import Sampler
from mlx_server.engine.model.speculative import (
    DraftModel,
    PairedModel,
    PromptLookup,
    Speculation,
    _lookup,
    install,
    trim_rows,
)

HEADS, DIM = 2, 64


def _rows(kind: str, lengths: list[int]) -> tuple[Any, list[mx.array]]:
    """A batch cache of rows with these lengths, and each row's keys as fed."""
    fed, singles = [], []
    for i, n in enumerate(lengths):
        k = mx.random.normal((1, HEADS, n, DIM), key=mx.random.key(i))
        c = KVCache() if kind == "f16" else SequenceQuantizedKVCache(bits=8)
        c.update_and_fetch(k, k)
        fed.append(k)
        singles.append(c)
    batch = BatchKVCache.merge(singles) if kind == "f16" else BatchQuantizedKVCache.merge(singles)
    return batch, fed


def _keys(cache: Any) -> mx.array:
    if isinstance(cache, KVCache):
        return cache.keys[..., : cache.offset, :]
    keys = cache.keys
    return mx.dequantize(*keys, group_size=64, bits=8)[..., : cache.offset, :]


@pytest.mark.parametrize("kind", ["f16", "q8"])
def test_rows_trim_by_their_own_counts(kind: str) -> None:
    batch, fed = _rows(kind, [5, 9, 3])
    step = mx.random.normal((3, HEADS, 4, DIM), key=mx.random.key(99))
    batch.update_and_fetch(step, step)  # a verify pass: four tokens for every row
    trim_rows([batch], [1, 3, 0])
    for i, (keys, drop) in enumerate(zip(fed, [1, 3, 0], strict=True)):
        want = mx.concatenate([keys, step[i : i + 1, :, : 4 - drop]], axis=2)
        got = _keys(batch.extract(i))
        assert got.shape == want.shape
        if kind == "f16":
            assert mx.array_equal(got, want)
        else:
            reference = SequenceQuantizedKVCache(bits=8)
            reference.update_and_fetch(want, want)
            assert mx.allclose(got, _keys(reference), atol=1e-5)
    # the next token lands after each row's kept tokens, at that row's own position
    offsets: list[int] = batch.offset.tolist()  # type: ignore[assignment]
    assert offsets == [5 + 3, 9 + 1, 3 + 4]


def test_prompt_lookup_continues_the_latest_match() -> None:
    history = np.array([1, 2, 3, 9, 8, 7, 1, 2, 3, 4, 5, 1, 2, 3])
    assert _lookup(history, 3) == [4, 5, 1]  # the later "1 2 3" wins over the first one
    assert _lookup(np.array([5, 6, 7, 9, 6, 7]), 2) == [9, 6]  # falls back to the two-token match
    assert _lookup(np.array([5, 6, 7, 6]), 2) == []  # one repeated token is chance, not a quote
    assert _lookup(np.array([1, 2, 3, 4]), 4) == []  # nothing repeats
    assert _lookup(np.array([4, 5, 4, 5]), 8) == [4, 5]  # never past the end of what exists


def test_a_row_whose_drafts_keep_failing_probes_with_one_token() -> None:
    seen: list[tuple[int, int, int]] = []
    spec = Speculation(PromptLookup(), lambda grid, caches: grid, lambda uid: 4, lambda *r: seen.append(r))
    assert spec.budget(7) == 4
    spec.judged([7], [4], [0])
    assert spec.budget(7) == 4
    spec.judged([7], [4], [0])
    assert spec.budget(7) == 1  # two rounds kept nothing: probe
    spec.judged([7], [1], [1])
    assert spec.budget(7) == 4  # the probe was kept: full length again
    spec.judged([8], [0], [0])
    assert 7 not in spec.misses and seen[-1] == (8, 0, 0)  # a row that left is forgotten; every round is counted


# ---- the sampled distribution ---------------------------------------------------------------------------------

PARAMS = dict(temperature=1.5, top_k=4)
SEEDS = 600


def _probs(model: Any, tokens: list[int]) -> np.ndarray:
    logits = model(mx.array(tokens)[None])[:, -1, :].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    weights = Sampler(SamplingParams(**PARAMS)).weights(lp)
    return np.array(mx.softmax(weights, axis=-1)[0])


def _sample_pairs(model: Any, prompt: list[int], eos: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    paired = PairedModel(model, model)
    generator = BatchGenerator(paired, stop_tokens=[[t] for t in eos], completion_batch_size=64)
    stats = [0, 0]

    def record(uid: int, drafted: int, accepted: int) -> None:
        stats[0] += drafted
        stats[1] += accepted

    def verify(grid: mx.array, caches: list[Any]) -> mx.array:
        return model(grid, cache=caches[: paired.split])

    install(generator, Speculation(DraftModel(paired, model.args.vocab_size), verify, lambda uid: 3, record))
    samplers = [Sampler(SamplingParams(seed=s, **PARAMS)) for s in range(SEEDS)]
    uids = generator.insert([prompt] * SEEDS, max_tokens=[2] * SEEDS, samplers=samplers)
    out: dict[int, list[int]] = {u: [] for u in uids}
    while generator._unprocessed_sequences or len(generator._prompt_batch) or len(generator._generation_batch):
        for r in generator.next_generated():
            out[r.uid].append(r.token)
    return [(t[0], t[1]) for t in out.values()], stats


def _p_value(observed: dict[tuple[int, int], int], expected: dict[tuple[int, int], float]) -> float:
    """Pearson's chi-square p-value; cells expected fewer than 5 times are pooled (the test's usual condition)."""
    if any(cell not in expected for cell in observed):
        return 0.0  # a pair the distribution cannot produce
    total = sum(observed.values())
    mass = sum(float(p) for p in expected.values())
    counts, want, pooled = [], [], [0.0, 0.0]
    for cell, p in expected.items():
        e = float(p) / mass * total
        if e < 5:
            pooled[0] += observed.get(cell, 0)
            pooled[1] += e
        else:
            counts.append(observed.get(cell, 0))
            want.append(e)
    if pooled[1] > 0:
        counts.append(pooled[0])
        want.append(pooled[1])
    return float(chisquare(np.array(counts, dtype=np.float64), np.array(want, dtype=np.float64)).pvalue)


def test_sampled_output_keeps_the_target_distribution(tiny_llama: Path) -> None:
    model, tokenizer = load(str(tiny_llama))
    prompt = tokenizer.encode("The river bends twice")
    first = _probs(model, prompt)
    exact: dict[tuple[int, int], float] = {}
    wrong: dict[tuple[int, int], float] = {}
    for a in np.flatnonzero(first):
        second = _probs(model, [*prompt, int(a)])
        draft = int(np.argmax(second))  # what the identical draft proposes
        for b in np.flatnonzero(second):
            exact[(int(a), int(b))] = first[a] * second[b]
            # the wrong rule: the draft survives with q(d), or is redrawn from all of q (itself included)
            biased = second[b] * (1 - second[draft]) + (second[draft] if b == draft else 0.0)
            wrong[(int(a), int(b))] = first[a] * biased
    pairs, (drafted, accepted) = _sample_pairs(model, prompt, sorted(tokenizer.eos_token_ids))
    observed: dict[tuple[int, int], int] = {}
    for pair in pairs:
        observed[pair] = observed.get(pair, 0) + 1
    assert len(pairs) == SEEDS
    assert 0 < accepted < drafted  # drafts were judged both ways
    assert _p_value(observed, exact) > 1e-3
    assert _p_value(observed, wrong) < 1e-3
