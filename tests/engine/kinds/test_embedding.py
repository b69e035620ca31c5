"""Embed requests through the real engine: packed batches equal one-at-a-time vectors, `dimensions` and
truncation, generation models embed too, and a large embed never freezes a running stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from support.embed_reference import ReferenceEncoder, cosine
from support.enginetools import Waiter, submit, tokens_so_far
from mlx_server.engine.engine import Engine
from mlx_server.engine.loop.budget import kv_bound
from mlx_server.contract.errors import BadRequest
from mlx_server.contract.events import Done, Embeddings, Failed, Started
from mlx_server.contract.requests import EmbedRequest, SamplingParams
from support.serving import make_config
from support.tinyembedders import MAX_TOKENS, build_tiny_encoder
from support.tinymodels import build_tiny_model

GREEDY = SamplingParams(temperature=0.0)
TEXTS = ("hello world", "the river runs under the old stone bridge", "ok", "a b c d e f g h i j k l m n o p")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), seed=4)


@pytest.fixture
def engine(encoder: Path, tiny_llama: Path, tmp_path: Path) -> Iterator[Engine]:
    e = Engine(make_config(tmp_path, {"enc": {"source": str(encoder)}, "llm": {"source": str(tiny_llama)}},
                           prefill_slice=0.01))
    e.start()
    yield e
    e.stop()


def embed(engine: Engine, model: str, inputs: tuple[Any, ...], **kw: Any) -> Waiter:
    w = Waiter(EmbedRequest(model=model, inputs=inputs, **kw))
    engine.submit(w.request, w)
    return w


def vectors(w: Waiter, timeout: float = 60) -> np.ndarray:
    end = w.wait(timeout)
    assert isinstance(end, Done), end
    [result] = [e for e in w.seen if isinstance(e, Embeddings)]
    assert end.usage.prompt_tokens == result.prompt_tokens > 0
    return result.vectors


def test_concurrent_requests_are_packed_and_equal_one_at_a_time(engine: Engine, encoder: Path) -> None:
    alone = [vectors(embed(engine, "enc", (t,)))[0] for t in TEXTS]
    together = [embed(engine, "enc", TEXTS), embed(engine, "enc", TEXTS[::-1]), embed(engine, "enc", TEXTS[:2])]
    first, backwards, two = (vectors(w) for w in together)
    assert first.shape == (4, 32) and first.dtype == np.float32
    np.testing.assert_allclose(first, np.stack(alone), atol=1e-5)
    np.testing.assert_allclose(backwards, np.stack(alone[::-1]), atol=1e-5)  # rows in input order
    np.testing.assert_allclose(two, np.stack(alone[:2]), atol=1e-5)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)  # Ollama returns unit vectors
    ref = ReferenceEncoder(encoder)  # an independent numpy forward pass of the same checkpoint
    tokenizer = engine.preparer.files("enc").tokenizer
    for text, vector in zip(TEXTS, alone):
        assert cosine(vector, ref.embed(tokenizer.encode([text])[0], "mean")) >= 0.9999


def test_dimensions_truncation_and_bad_inputs(engine: Engine) -> None:
    full = vectors(embed(engine, "enc", TEXTS[:2]))
    cut = vectors(embed(engine, "enc", TEXTS[:2], dimensions=8))
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)  # Matryoshka: cut, renormalize
    np.testing.assert_allclose(cut, expected, atol=1e-5)

    long_text = " ".join(["river"] * (3 * MAX_TOKENS))
    truncated = embed(engine, "enc", ("ok", long_text))
    assert vectors(truncated).shape == (2, 32)
    ok_tokens = len(engine.preparer.files("enc").tokenizer.encode(["ok"])[0])
    assert next(e for e in truncated.seen if isinstance(e, Started)).prompt_tokens == ok_tokens + MAX_TOKENS
    refused = embed(engine, "enc", ("ok", long_text), truncate=False).wait()
    assert isinstance(refused, Failed) and isinstance(refused.error, BadRequest)
    assert "input 1 " in refused.error.message
    too_wide = embed(engine, "enc", ("ok",), dimensions=33).wait()
    assert isinstance(too_wide, Failed) and "dimensions" in too_wide.error.message
    bad_ids = embed(engine, "enc", ((1, 2, 10**6),)).wait()
    assert isinstance(bad_ids, Failed) and "vocabulary" in bad_ids.error.message
    empty = embed(engine, "enc", ())
    assert vectors_or_empty(empty).shape == (0, 32)
    generate = submit(engine, "enc", "hello").wait()
    assert isinstance(generate, Failed) and generate.error.message == '"enc" does not support generate'


def vectors_or_empty(w: Waiter) -> np.ndarray:
    end = w.wait()
    assert isinstance(end, Done)
    return next(e for e in w.seen if isinstance(e, Embeddings)).vectors


def test_a_generation_model_embeds_with_mean_pooled_hidden_states(engine: Engine, tiny_llama: Path) -> None:
    token_inputs = ((5, 6, 7, 8, 9), (11, 12, 13))
    got = vectors(embed(engine, "llm", token_inputs))
    model, _ = load(str(tiny_llama))
    for ids, vector in zip(token_inputs, got):
        hidden = np.array(model.model(mx.array([list(ids)])).astype(mx.float32))[0]  # the stack, no LM head
        mean = hidden.mean(axis=0)
        assert cosine(vector, mean / np.linalg.norm(mean)) >= 0.9999
    texts = vectors(embed(engine, "llm", ("hello there",)))
    assert texts.shape == (1, model.args.hidden_size)


def test_a_large_embed_does_not_freeze_a_running_stream(encoder: Path, tiny_llama: Path, tmp_path: Path) -> None:
    docs = tuple(f"document {i} about the river and the stone bridge" for i in range(400))

    def tokens_during_embed(slice_seconds: float) -> tuple[int, int]:
        home = tmp_path / str(slice_seconds)
        home.mkdir()
        e = Engine(make_config(home, {"enc": {"source": str(encoder)}, "llm": {"source": str(tiny_llama)}},
                               prefill_slice=slice_seconds, prefill_chunk=64))
        e.start()
        try:
            vectors(embed(e, "enc", ("warm up",)))
            stream = submit(e, "llm", "one two", sampling=GREEDY, max_tokens=100000)
            stream.first_delta()
            big = embed(e, "enc", docs)
            assert isinstance(big.events.get(timeout=60), Started)
            before = tokens_so_far(stream)
            assert vectors(big).shape == (400, 32)
            during = tokens_so_far(stream) - before
            e.cancel(stream.request.request_id)
            stream.wait()
            return during, e.status().counters.prefill_slices
        finally:
            e.stop()

    sliced, slices = tokens_during_embed(0.005)
    whole, _ = tokens_during_embed(0)
    assert whole <= 3  # the embed in one go: the stream stood still meanwhile
    assert slices > 10 and sliced >= slices // 2  # in slices: a decode step between (nearly) every two


def test_cancel_and_timeout_end_an_embed(engine: Engine) -> None:
    docs = tuple(f"text number {i}" for i in range(2000))
    w = embed(engine, "enc", docs, timeout=0.001)
    end = w.wait()
    assert isinstance(end, Failed) and "timed out" in end.error.message
    w = embed(engine, "enc", docs)
    assert isinstance(w.events.get(timeout=30), Started)
    engine.cancel(w.request.request_id)
    end = w.wait()
    assert isinstance(end, Done) and end.reason == "cancelled"
    assert not any(isinstance(e, Embeddings) for e in w.seen)
    assert vectors(embed(engine, "enc", ("still serving",))).shape == (1, 32)


def test_an_embedding_model_is_never_evicted_mid_batch(encoder: Path, tmp_path: Path) -> None:
    # A generation model whose 20 MiB of weights fit the budget only once the encoder (and its working memory)
    # is gone: it must wait for the embed to finish, then evict the encoder.
    llm = build_tiny_model(tmp_path / "llm", arch="llama", seed=0, padding_bytes=20 * 2**20)
    models = {"enc": {"source": str(encoder)}, "llm": {"source": str(llm)}}
    probe = Engine(make_config(tmp_path, models))
    enc, gen_files = probe.preparer.files("enc"), probe.preparer.files("llm")
    probe.preparer.close()
    # The generation model's weights and KV fit, plus half the encoder: never both.
    budget = gen_files.weights + kv_bound([16], gen_files.kv_per_token) + enc.weights // 2
    home = tmp_path / "tight"
    home.mkdir()
    e = Engine(make_config(home, models, memory_budget=budget, prefill_slice=0.005))
    e.start()
    try:
        docs = tuple(f"passage {i} on rivers and bridges" for i in range(1500))
        big = embed(e, "enc", docs)
        assert isinstance(big.events.get(timeout=60), Started)
        gen = submit(e, "llm", "hello", sampling=GREEDY, max_tokens=3)
        result = vectors(big)
        assert isinstance(gen.wait(), Done)
        evictions = e.status().pool.evictions
    finally:
        e.stop()
    assert result.shape == (1500, 32) and np.isfinite(result).all()
    assert gen.ended_at > big.ended_at and evictions == 1  # it waited for the batch, then made room
