"""Quantized KV caches inside mlx_lm's continuous batch (engine/model/kvquant.py), on real MLX.

The batched cache is checked two ways: operation by operation against mlx_lm's own BatchKVCache fed the same keys
and values (same bookkeeping, contents within one quantization step), and end to end in a real BatchGenerator on a
tiny model (batching changes no token, and one sequence alone equals mlx_lm's single-sequence QuantizedKVCache).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import (
    ArraysCache,
    BatchKVCache,
    KVCache,
    LRUPromptCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from mlx_server.engine.model.kvquant import (
    BatchQuantizedKVCache,
    SequenceQuantizedKVCache,
    bytes_per_token,
    make_cache,
)
from support.tinymodels import build_tiny_model

HEADS, DIM = 2, 64
PROMPTS = ["The river", "A long time ago in a valley far away", "Numbers: 1 2 3", "Hello"]


# ---- cache operations against BatchKVCache --------------------------------------------------------------------


def kv(n: int, seed: int, rows: int = 1) -> tuple[mx.array, mx.array]:
    k = mx.random.normal((rows, HEADS, n, DIM), key=mx.random.key(seed))
    v = mx.random.normal((rows, HEADS, n, DIM), key=mx.random.key(seed + 1000))
    return k, v


def sequences(lengths: list[int], bits: int, seed: int) -> tuple[list[KVCache], list[SequenceQuantizedKVCache]]:
    plain, quant = [], []
    for i, n in enumerate(lengths):
        p, q = KVCache(), SequenceQuantizedKVCache(bits=bits)
        if n:
            k, v = kv(n, seed + i)
            p.update_and_fetch(k, v)
            q.update_and_fetch(k, v)
        plain.append(p)
        quant.append(q)
    return plain, quant


def dequantized(q: tuple[mx.array, mx.array, mx.array], bits: int) -> mx.array:
    return mx.dequantize(*q, group_size=64, bits=bits)


def assert_close(got: mx.array, want: mx.array, bits: int, valid: mx.array) -> None:
    # Affine quantization rounds each element to the nearest of 2**bits levels spanning its group of 64: the error
    # is at most half a step; one whole step leaves room for the scale and bias being rounded themselves.
    groups = want.reshape(*want.shape[:-1], -1, 64)
    step = (groups.max(axis=-1) - groups.min(axis=-1)) / (2**bits - 1)
    err = mx.abs(got - want).reshape(groups.shape).max(axis=-1)
    assert mx.all(mx.where(valid[..., None], err <= step + 1e-5, True)).item()


def assert_same(bq: BatchQuantizedKVCache, bk: BatchKVCache, bits: int) -> None:
    assert bq._idx == bk._idx and bq.size() == bk.size()
    assert bq.offset.tolist() == bk.offset.tolist()
    assert bq.left_padding.tolist() == bk.left_padding.tolist()
    for n in (1, 3):
        assert mx.array_equal(bq.make_mask(n), bk.make_mask(n, return_array=True))
    assert bq.empty() == bk.empty()
    if bk.keys is None:
        return
    (qk, qv), (k, v) = bq.keys_and_values(), bk.keys_and_values()
    # Only unmasked positions hold a row's tokens; padding is whatever either cache left there.
    valid = bk.make_mask(1, return_array=True)[:, 0, 0, : bk._idx][:, None, :]
    assert_close(dequantized(qk, bits), k, bits, valid)
    assert_close(dequantized(qv, bits), v, bits, valid)


def update_both(bq: BatchQuantizedKVCache, bk: BatchKVCache, n: int, seed: int) -> None:
    rows = bk.offset.shape[0]
    k, v = kv(n, seed, rows)
    got_k, got_v = bq.update_and_fetch(k, v)
    want_k, want_v = bk.update_and_fetch(k, v)
    assert got_k[0].shape[2] == want_k.shape[2] and got_k[0].dtype == mx.uint32


@pytest.mark.parametrize("bits", [8, 4])
def test_batch_operations_track_batch_kv_cache(bits: int) -> None:
    plain, quant = sequences([5, 0, 9], bits, seed=1)
    bk, bq = KVCache.merge(plain), SequenceQuantizedKVCache.merge(quant)
    assert isinstance(bq, BatchQuantizedKVCache) and (bq.bits, bq.group_size) == (bits, 64)
    assert_same(bq, bk, bits)

    update_both(bq, bk, 1, seed=10)  # a decode step
    assert_same(bq, bk, bits)

    # A padded prefill chunk: rows of 4, 2 and 3 tokens, the short ones right-padded until finalize.
    for c in (bq, bk):
        c.prepare(lengths=[4, 2, 3], right_padding=[0, 2, 1])
    update_both(bq, bk, 4, seed=11)
    for c in (bq, bk):
        c.finalize()
    assert_same(bq, bk, bits)

    bq.filter([0, 2])  # row 1 had the most left padding: the shared columns go
    bk.filter([0, 2])
    assert_same(bq, bk, bits)

    plain2, quant2 = sequences([20, 3], bits, seed=30)  # longer than this batch: this side gets left-padded
    bk.extend(KVCache.merge(plain2))
    bq.extend(SequenceQuantizedKVCache.merge(quant2))
    assert_same(bq, bk, bits)
    update_both(bq, bk, 300, seed=12)  # past the first 256-token step: both grow
    assert_same(bq, bk, bits)

    for i in range(4):
        extracted, want = bq.extract(i), bk.extract(i)
        assert isinstance(extracted, SequenceQuantizedKVCache)
        got: Any = extracted  # upstream's QuantizedKVCache declares its keys as None
        assert got.offset == want.offset == got.size()
        ones = mx.ones((1, 1, want.offset), dtype=mx.bool_)
        assert_close(dequantized(got.keys, bits), want.keys, bits, ones)
        assert_close(dequantized(got.values, bits), want.values, bits, ones)

    assert bq.trim(7) == bk.trim(7) == 7
    assert_same(bq, bk, bits)
    assert bq.is_trimmable()
    mx.eval(bq.state)
    twin = copy.deepcopy(bq)  # BatchGenerator splits a prompt batch by deep-copying its caches
    update_both(bq, bk, 2, seed=13)
    assert twin._idx == bq._idx - 2 and twin.nbytes > 0


def test_empty_caches_merge_extend_and_prefill() -> None:
    bq = SequenceQuantizedKVCache.merge([SequenceQuantizedKVCache(), SequenceQuantizedKVCache()])
    bk = KVCache.merge([KVCache(), KVCache()])
    assert bq.empty() and bq.nbytes == 0 and bq.size() == 0
    bq.extend(SequenceQuantizedKVCache.merge([SequenceQuantizedKVCache()]))
    bk.extend(KVCache.merge([KVCache()]))
    assert_same(bq, bk, 8)
    for c in (bq, bk):
        c.prepare(lengths=[3, 1, 2], right_padding=[0, 2, 1])
    update_both(bq, bk, 3, seed=5)
    for c in (bq, bk):
        c.finalize()
    assert_same(bq, bk, 8)
    assert SequenceQuantizedKVCache().nbytes == 0  # upstream's nbytes fails on a cache with no keys yet
    with pytest.raises(ValueError, match="quantized differently"):
        SequenceQuantizedKVCache.merge([SequenceQuantizedKVCache(bits=8), SequenceQuantizedKVCache(bits=4)])


# ---- a real BatchGenerator on a tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    # Head size 64: quantization groups of 64 run along it (the shared tiny models' 16 cannot be quantized).
    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama-kvq"), arch="llama", hidden_size=256, num_heads=4, num_kv_heads=2
    )
    lm, tok = load(str(path))[:2]
    return lm, tok


def prefilled(model: Any, ids: list[int], kv: str) -> list[Any]:
    """A prompt's own cache holding all but its last token, as engine/loop/prefill.py leaves it."""
    cache = make_cache(model, kv)
    if len(ids) > 1:
        model(mx.array(ids[:-1])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def join(gen: BatchGenerator, ids: list[int], cache: list[Any], max_tokens: int) -> int:
    """Insert a prefilled prompt the way GenerateWorker._join does: its last token, its cache, its history."""
    [uid] = gen.insert([ids[-1:]], max_tokens=[max_tokens], caches=[cache], all_tokens=[ids[:-1]])
    return uid


def busy(gen: BatchGenerator) -> bool:
    return bool(len(gen._generation_batch) or len(gen._prompt_batch) or gen._unprocessed_sequences)


def generate(
    model: tuple[Any, Any], prompts: list[Any], kv: str, joins: list[int], max_tokens: list[int]
) -> list[list[int]]:
    """Greedy tokens per prompt (text, or token ids); prompt i joins the batch before decode step joins[i]."""
    lm, tok = model
    gen = BatchGenerator(lm, completion_batch_size=8, prefill_batch_size=8)
    owner: dict[int, int] = {}
    out: list[list[int]] = [[] for _ in prompts]
    step = 0
    while len(owner) < len(prompts) or busy(gen):
        for i, at in enumerate(joins):
            if at == step:
                ids = tok.encode(prompts[i]) if isinstance(prompts[i], str) else prompts[i]
                owner[join(gen, ids, prefilled(lm, ids, kv), max_tokens[i])] = i
        if kv != "f16" and gen._generation_batch.prompt_cache:  # the quantized batch cache really is in use
            assert isinstance(gen._generation_batch.prompt_cache[0], BatchQuantizedKVCache)
        for r in gen.next()[1]:
            out[owner[r.uid]].append(r.token)
        step += 1
    gen.close()
    return out


@pytest.mark.parametrize("kv", ["q8", "q4"])
def test_batching_does_not_change_quantized_greedy(model: tuple[Any, Any], kv: str) -> None:
    lengths = [24, 18, 30, 12]  # different lengths: sequences leave mid-batch (filter) while others decode on
    together = generate(model, PROMPTS, kv, joins=[0, 0, 3, 7], max_tokens=lengths)
    alone = [generate(model, [p], kv, joins=[0], max_tokens=[n])[0] for p, n in zip(PROMPTS, lengths, strict=True)]
    assert together == alone
    assert all(len(t) == n for t, n in zip(together, lengths, strict=True))
    # One sequence alone is exactly what mlx_lm's own single-sequence quantized cache gives.
    lm, tok = model
    for p, n, got in zip(PROMPTS, lengths, alone, strict=True):
        cache = [QuantizedKVCache(group_size=64, bits=int(kv[1:])) for _ in lm.layers]
        want = [int(t) for t, _ in generate_step(mx.array(tok.encode(p)), lm, max_tokens=n, prompt_cache=cache)]
        assert got == want


def test_q8_mostly_agrees_with_f16(model: tuple[Any, Any]) -> None:
    # Measured on this model (8 prompts, 40 greedy tokens): q8's first token matches f16 for 7 of 8 prompts, and
    # fed f16's own continuation q8 picks the same argmax at 96% of positions (q4: 2/8 and 43%). A random tiny
    # model has many near-ties (top-2 logit gaps under 0.1), so whole greedy runs diverge within a few tokens.
    # What is asserted: most first tokens agree at q8, and q8 moves the logits far less than q4.
    joins, lengths = [0, 0, 3, 7], [4] * 4
    f16 = generate(model, PROMPTS, "f16", joins, lengths)
    q8 = generate(model, PROMPTS, "q8", joins, lengths)
    assert sum(a[0] == b[0] for a, b in zip(f16, q8, strict=True)) >= 3
    lm, tok = model
    for p in PROMPTS:
        ids = mx.array(tok.encode(p))[None]
        ref = lm(ids)[0, -1]
        drift = {kv: mx.abs(lm(ids, cache=make_cache(lm, kv))[0, -1] - ref).mean() for kv in ("q8", "q4")}
        assert (drift["q8"] < drift["q4"]).item()


def test_extracted_caches_serve_prefix_hits(model: tuple[Any, Any]) -> None:
    lm, tok = model
    store = LRUPromptCache(max_size=8)
    first = tok.encode("shared prefix " * 6 + "one")
    gen = BatchGenerator(lm)
    uid = join(gen, first, prefilled(lm, first, "q8"), 6)
    bystander = tok.encode(PROMPTS[0])
    other = join(gen, bystander, prefilled(lm, bystander, "q8"), 50)
    join(gen, bystander[:1], make_cache(lm, "q8"), 50)  # a one-token prompt joins with a still-empty cache
    waiting = gen.prompt_cache_nbytes  # counts the caches not yet merged, the empty one included (runner's cap)
    assert waiting > 0
    for _ in range(4):
        gen.next()
    assert gen.prompt_cache_nbytes > waiting  # now the batch's own quantized buffers
    # Out of a live batch of two, mid-generation: the runner's _remove path.
    (cache, tokens), = gen.remove([uid], return_prompt_caches=True).values()
    assert all(isinstance(c, SequenceQuantizedKVCache) and c.offset == len(tokens) for c in cache)
    mx.eval([c.state for c in cache])
    store.insert_cache("m", list(tokens), cache)
    assert store.nbytes == sum(c.nbytes for c in cache) > 0
    assert other in {r.uid for r in gen.next()[1]}  # the batch goes on without it
    gen.close()

    second = tok.encode("shared prefix " * 6 + "two, and more")
    hit, rest = store.fetch_nearest_cache("m", second)
    assert hit is not None and 0 < len(rest) < len(second)
    assert all(isinstance(c, SequenceQuantizedKVCache) for c in hit) and hit[0].offset == len(second) - len(rest)
    assert store._trie.get("m", list(tokens)).prompt_cache[0].offset == len(tokens)  # a private copy was trimmed
    lm(mx.array(rest[:-1])[None], cache=hit)
    mx.eval([c.state for c in hit])

    warm = BatchGenerator(lm)
    uid = join(warm, second, hit, 12)
    got = [r.token for _ in range(30) for r in warm.next()[1] if r.uid == uid]
    warm.close()
    assert len(got) == 12
    assert got == generate(model, [second], "q8", joins=[0], max_tokens=[12])[0]  # the same prompt, no cache hit


def test_generator_prefills_quantized_prompts_itself(model: tuple[Any, Any]) -> None:
    # Whole prompts handed to BatchGenerator with empty quantized caches: it prefills them as one right-padded
    # batch (prepare / finalize) and splits the batch (deepcopy, filter) on its way to decoding.
    lm, tok = model
    gen = BatchGenerator(lm)
    ids = [tok.encode(p) for p in PROMPTS]
    uids = gen.insert(ids, max_tokens=[8] * 4, caches=[make_cache(lm, "q8") for _ in ids])
    out: dict[int, list[int]] = {u: [] for u in uids}
    for _ in range(40):
        for r in gen.next()[1]:
            out[r.uid].append(r.token)
    gen.close()
    got = [out[u] for u in uids]
    assert all(len(t) == 8 for t in got)
    for p, toks in zip(PROMPTS, got, strict=True):
        cache = [QuantizedKVCache(group_size=64, bits=8) for _ in lm.layers]
        want = [int(t) for t, _ in generate_step(mx.array(tok.encode(p)), lm, max_tokens=8, prompt_cache=cache)]
        assert toks == want


# ---- make_cache and the memory budget ------------------------------------------------------------------------


def test_make_cache_settings(model: tuple[Any, Any]) -> None:
    lm, _ = model
    assert [type(c) for c in make_cache(lm, "f16")] == [type(c) for c in make_prompt_cache(lm)]
    for kv, bits in (("q8", 8), ("q4", 4)):
        caches = make_cache(lm, kv)
        assert len(caches) == len(lm.layers)
        assert all(type(c) is SequenceQuantizedKVCache and (c.bits, c.group_size) == (bits, 64) for c in caches)
    with pytest.raises(ValueError, match="unknown KV cache setting"):
        make_cache(lm, "q3")

    def with_caches(*caches: Any) -> Any:
        return SimpleNamespace(layers=list(caches), make_cache=lambda: list(caches))

    with pytest.raises(ValueError, match="layer 1 of this model uses RotatingKVCache"):
        make_cache(with_caches(KVCache(), RotatingKVCache(max_size=64)), "q8")
    with pytest.raises(ValueError, match="layer 0 of this model uses ArraysCache"):
        make_cache(with_caches(ArraysCache(size=2), KVCache()), "q4")
    assert len(make_cache(with_caches(ArraysCache(size=2)), "f16")) == 1  # f16 takes any model
    head16 = SimpleNamespace(layers=[0, 0], args=SimpleNamespace(hidden_size=64, num_attention_heads=4))
    with pytest.raises(ValueError, match="divisible by 64; this model's is 16"):
        make_cache(head16, "q8")


def test_bytes_per_token() -> None:
    # Llama-3-8B's shape: 32 layers, 8 KV heads of 128, float16.
    f16, q8, q4 = (bytes_per_token(8, 128, 32, kv, 2) for kv in ("f16", "q8", "q4"))
    assert f16 == 2 * 32 * 8 * 128 * 2 == 131072
    assert q8 == 2 * 32 * 8 * (128 + 2 * 2 * 2)  # a byte per element, a float16 scale and bias per group of 64
    assert q4 == 2 * 32 * 8 * (64 + 2 * 2 * 2)
    assert 0.5 < q8 / f16 < 0.55 and 0.25 < q4 / f16 < 0.3
    # What a cache filled to exactly one growth step actually holds, per token, for one layer.
    for kv_setting, bits in (("q8", 8), ("q4", 4)):
        for dtype in (mx.float16, mx.float32):
            c = SequenceQuantizedKVCache(bits=bits)
            k, v = kv(256, seed=99)
            c.update_and_fetch(k.astype(dtype), v.astype(dtype))
            assert c.nbytes == 256 * bytes_per_token(HEADS, DIM, 1, kv_setting, dtype.size)
