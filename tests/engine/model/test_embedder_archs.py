"""nomic-bert, ModernBERT and decoder (Qwen3-Embedding) embedders on tiny random checkpoints, with real MLX.

nomic-bert and ModernBERT are checked against numpy forward passes in tests/support/embed_reference.py that are written
independently of the MLX modules — nomic-bert's from the model's published description (Nomic's own
`modeling_hf_nomic_bert.py` and the nomic-bert-2048 model card; the hub checkpoint itself cannot be downloaded
here), ModernBERT's from transformers' modeling code. Decoders are checked against mlx_lm's own forward pass of
each input alone, unpadded, through a stock `mlx_lm.utils.load_model`: the last token's final hidden state,
normalized. Every vector must match to cosine ≥ 0.9999, in a padded batch and one at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from support.embed_reference import ModernBertReference, NomicReference, cosine
from mlx_server.models.embedinfo import embedding_info
from mlx_server.engine.model.embedders import Embedder, load_embedder
from support.tinyembedders import (HIDDEN, MAX_TOKENS, build_tiny_modernbert, build_tiny_nomic,
                           build_tiny_qwen3_embedder)

TEXTS = ["the weather in Paris", "a journey of 1000 miles begins with a single step", "fox",
         "On Monday the streets were full of people and the weather was light rain in Paris all day long"]


def check(embedder: Embedder, reference: Any, texts: list[str], pooling: str) -> np.ndarray:
    ids = embedder.tokenizer.encode(texts)
    assert len({len(row) for row in ids}) > 1, "lengths must differ, or padding is not exercised"
    batched = np.array(embedder.embed(ids))
    assert batched.dtype == np.float32 and batched.shape == (len(texts), embedder.dimensions)
    for i, row in enumerate(ids):
        expected = reference(row) if callable(reference) else reference.embed(row, pooling)
        alone = np.array(embedder.embed([row]))[0]
        assert cosine(batched[i], expected) >= 0.9999, (texts[i], cosine(batched[i], expected))
        assert cosine(alone, expected) >= 0.9999, (texts[i], cosine(alone, expected))
        np.testing.assert_allclose(batched[i], alone, atol=2e-5)  # padding never changes a vector
        assert abs(float(np.linalg.norm(batched[i])) - 1.0) < 1e-5
    sims = batched @ batched.T
    assert sims[0, 2] < 0.99 and sims[1, 3] < 0.99, "random model too degenerate to tell vectors apart"
    return batched


# ---- nomic-bert -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    {},  # nomic-embed-text-v1.5's choices: SwiGLU, no biases, full NeoX-layout rotary
    {"rotary_fraction": 0.5, "interleaved": True, "biases": True, "activation": "geglu", "prefix": "bert."},
])
def test_tiny_nomic_bert_matches_numpy_reference(tmp_path: Path, variant: dict[str, Any]) -> None:
    path = build_tiny_nomic(tmp_path / "m", seed=11, **variant)
    embedder = load_embedder(path)
    assert embedder.info.architecture == "nomic_bert" and embedder.dimensions == HIDDEN
    # n_positions is 64, but the model was trained on max_trained_positions (Ollama's 2048 for nomic-embed-text).
    assert embedder.max_length == MAX_TOKENS == embedding_info(path).max_length
    check(embedder, NomicReference(path), TEXTS, "mean")


def test_nomic_rope_is_what_makes_order_matter(tmp_path: Path) -> None:
    # No position table: without a working rotary embedding, word order would not change the vector.
    embedder = load_embedder(build_tiny_nomic(tmp_path / "m", seed=4))
    ids, = embedder.tokenizer.encode(["paris weather rain"])
    swapped = [ids[0], ids[2], ids[1], *ids[3:]]
    a, b = np.array(embedder.embed([ids, swapped]))
    assert cosine(a, b) < 0.999


def test_nomic_variants_we_do_not_run_are_refused(tmp_path: Path) -> None:
    import json

    path = build_tiny_nomic(tmp_path / "m", seed=1)
    cfg = json.loads((path / "config.json").read_text())
    for key, value in (("prenorm", True), ("num_experts", 8), ("activation_function", "gelu")):
        (path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match="not supported|unsupported"):
            load_embedder(path)
    native = {k: v for k, v in cfg.items() if k != "n_embd"} | {"hidden_size": HIDDEN}
    (path / "config.json").write_text(json.dumps(native))
    with pytest.raises(ValueError, match="native layout"):
        load_embedder(path)


# ---- ModernBERT -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("new_config,prefix,pooling", [(False, "", "mean"), (True, "model.", "cls")])
def test_tiny_modernbert_matches_numpy_reference(tmp_path: Path, new_config: bool, prefix: str,
                                                 pooling: str) -> None:
    path = build_tiny_modernbert(tmp_path / "m", seed=13, new_config=new_config, prefix=prefix, pooling=pooling)
    embedder = load_embedder(path)
    assert embedder.info.architecture == "modernbert" and embedder.info.pooling == pooling
    # The longest text is ~20 tokens and the local window 3 either side: local layers really cut attention.
    check(embedder, ModernBertReference(path), TEXTS, pooling)


# ---- decoders (Qwen3-Embedding) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """mlx_lm's stock loader on the same weights in its own layout (`model.` names, tied head)."""
    from mlx_lm.utils import load_model

    path = build_tiny_qwen3_embedder(tmp_path_factory.mktemp("ref"), seed=21, bare=False)
    model, _ = load_model(path)

    def embed(ids: list[int]) -> np.ndarray:
        last = np.array(model.model(mx.array([ids]))[0, -1].astype(mx.float32), dtype=np.float64)
        return last / np.linalg.norm(last)

    return embed


@pytest.mark.parametrize("bare,tied", [(True, True), (False, True), (True, False)])
def test_tiny_qwen3_embedding_matches_mlx_lm_alone(tmp_path: Path, qwen3_reference: Any, bare: bool,
                                                   tied: bool) -> None:
    path = build_tiny_qwen3_embedder(tmp_path / "m", seed=21, bare=bare, tied=tied)
    embedder = load_embedder(path)
    assert embedder.info.architecture == "qwen3" and embedder.info.pooling == "last"
    assert "lm_head" not in embedder.model.lm  # never run, so never built (nor its memory spent)
    ids = embedder.tokenizer.encode(TEXTS)
    eos = embedder.tokenizer.tokenizer.token_to_id("<|endoftext|>")
    assert all(row[-1] == eos for row in ids)  # the tokenizer appends <|endoftext|>, whose state is the vector
    check(embedder, qwen3_reference, TEXTS, "last")


def test_qwen3_embedding_truncates_and_keeps_the_final_token(tmp_path: Path) -> None:
    embedder = load_embedder(build_tiny_qwen3_embedder(tmp_path / "m", seed=2))
    tokenizer = embedder.tokenizer
    ids, = tokenizer.encode([" ".join(TEXTS * 3)])
    assert len(ids) == MAX_TOKENS and ids[-1] == tokenizer.tokenizer.token_to_id("<|endoftext|>")
    assert np.array(embedder.embed([ids])).shape == (1, 64)
    # The preparation stage cuts an untruncated encoding (it must see the full length for `truncate: false`):
    # the same tokens, <|endoftext|> kept last, as Qwen3-Embedding pools on it.
    whole, = tokenizer.encode([" ".join(TEXTS * 3)], truncate=False)
    assert (tokenizer.leading, tokenizer.trailing) == (0, 1)
    assert tokenizer.cut(whole, MAX_TOKENS) == ids and tokenizer.cut(whole, 1) == ids[-1:]


def test_cut_keeps_leading_and_trailing_specials_of_bert(tmp_path: Path) -> None:
    tokenizer = load_embedder(build_tiny_nomic(tmp_path / "m", seed=2)).tokenizer
    text = " ".join(TEXTS * 3)
    whole, = tokenizer.encode([text], truncate=False)
    assert (tokenizer.leading, tokenizer.trailing) == (1, 1)
    assert tokenizer.cut(whole, MAX_TOKENS) == tokenizer.encode([text])[0]  # [CLS] … [SEP]
    assert tokenizer.cut(whole, 2) == [whole[0], whole[-1]]


def test_dtype_cast_applies_to_every_architecture(tmp_path: Path) -> None:
    embedder = load_embedder(build_tiny_nomic(tmp_path / "n", seed=3), dtype=mx.float16)
    assert embedder.model.emb_ln.weight.dtype == mx.float16
    out = embedder.embed(embedder.tokenizer.encode(TEXTS[:2]))
    assert out.dtype == mx.float32


# ---- through the real engine ------------------------------------------------------------------------------------


def test_nomic_and_qwen3_embedding_through_the_engine(tmp_path: Path) -> None:
    """models.yaml entries for both kinds: the preparation stage tokenizes, the loader builds, packed batches of
    two concurrent requests give the vectors the embedder gives alone."""
    from support.enginetools import Waiter
    from mlx_server.engine.engine import Engine
    from mlx_server.contract.events import Done, Embeddings
    from mlx_server.contract.requests import EmbedRequest
    from support.serving import make_config

    paths = {"nomic": build_tiny_nomic(tmp_path / "nomic", seed=5),
             "qwen3-embed": build_tiny_qwen3_embedder(tmp_path / "qwen3", seed=6)}
    engine = Engine(make_config(tmp_path, {name: {"source": str(p)} for name, p in paths.items()}))
    engine.start()
    try:
        for name, path in paths.items():
            waiters = [Waiter(EmbedRequest(model=name, inputs=tuple(texts))) for texts in (TEXTS, TEXTS[::-1])]
            for w in waiters:
                engine.submit(w.request, w)
            direct = load_embedder(path)
            expected = np.array(direct.embed(direct.tokenizer.encode(TEXTS)))
            for w, want in zip(waiters, (expected, expected[::-1])):
                assert isinstance(w.wait(60), Done), w.seen
                got = next(e for e in w.seen if isinstance(e, Embeddings)).vectors
                np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
    finally:
        engine.stop()
