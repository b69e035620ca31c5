"""Rerank requests through the real engine on tiny random rerankers: scores equal independent numpy forward passes
(BERT, XLM-R and ModernBERT cross-encoders, a Qwen3-Reranker-style decoder, tied and untied), a packed batch of
100 documents equals the documents scored one by one, truncation cuts the document and keeps the query, models
that cannot rerank refuse, rerankers neither chat nor embed, and a large rerank runs in slices beside a stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.events import Done, Failed, Scores, Started
from mlx_server.contract.requests import EmbedRequest, RerankRequest, SamplingParams
from mlx_server.engine.engine import Engine
from mlx_server.engine.prepare.rerank import prepare_rerank
from support.enginetools import Waiter, submit, tokens_so_far
from support.rerank_reference import CrossEncoderReference, Qwen3RerankerReference
from support.serving import make_config
from support.tinyembedders import MAX_TOKENS, build_tiny_encoder
from support.tinyrerankers import QWEN3_POSITIONS, build_tiny_cross_encoder, build_tiny_qwen3_reranker

QUERY = "where does the river run"
DOCS = ("the river runs under the old stone bridge", "hello world",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z", "ok", "stone", "the river")
# Seeds whose random heads spread these documents' scores over (0, 1).
CROSS = {"bert": 4, "xlm-roberta": 5, "modernbert": 4}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("rerankers")
    out = {arch: build_tiny_cross_encoder(tmp / arch, arch=arch, seed=seed) for arch, seed in CROSS.items()}
    out["qwen3"] = build_tiny_qwen3_reranker(tmp / "Qwen3-Reranker-tiny", seed=1)  # found by its name
    out["qwen3-untied"] = build_tiny_qwen3_reranker(tmp / "q3", seed=2, tied=False)  # found by models.yaml's kind
    out["embedder"] = build_tiny_encoder(tmp / "emb", seed=1)
    out["nli"] = build_tiny_cross_encoder(tmp / "nli", seed=1, labels=3)  # a classifier, forced by `kind: rerank`
    return out


@pytest.fixture(scope="module")
def engine(dirs: dict[str, Path], tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    models: dict[str, Any] = {name: {"source": str(path)} for name, path in dirs.items()}
    models["qwen3-untied"]["kind"] = models["nli"]["kind"] = "rerank"
    models["llm"] = {"source": str(tiny_llama)}
    e = Engine(make_config(tmp_path_factory.mktemp("rerank-engine"), models, prefill_slice=0.01))
    e.start()
    yield e
    e.stop()


def rerank(engine: Engine, model: str, documents: tuple[str, ...], query: str = QUERY, **kw: Any) -> Waiter:
    w = Waiter(RerankRequest(model=model, query=query, documents=documents, **kw))  # type: ignore[arg-type]
    engine.submit(w.request, w)
    return w


def scores(w: Waiter, timeout: float = 60) -> np.ndarray:
    end = w.wait(timeout)
    assert isinstance(end, Done), end
    [result] = [e for e in w.seen if isinstance(e, Scores)]
    assert result.scores.dtype == np.float32 and end.usage.prompt_tokens == result.prompt_tokens
    return result.scores


def reference(engine: Engine, name: str, path: Path, documents: tuple[str, ...]) -> np.ndarray:
    limit = engine.preparer.files(name).context_length
    ref: Any = Qwen3RerankerReference(path) if name.startswith("qwen3") else CrossEncoderReference(path)
    return np.array([ref.score(QUERY, d, limit) for d in documents])


@pytest.mark.parametrize("name", [*CROSS, "qwen3", "qwen3-untied"])
def test_scores_equal_a_numpy_forward_pass(engine: Engine, dirs: dict[str, Path], name: str) -> None:
    got = scores(rerank(engine, name, DOCS))
    want = reference(engine, name, dirs[name], DOCS)
    assert got.shape == (len(DOCS),) and ((got > 0) & (got < 1)).all()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert list(np.argsort(-got)) == list(np.argsort(-want))
    assert np.ptp(want) > 0.05  # the scores differ: the comparison has teeth


@pytest.mark.parametrize("name, every", [("bert", 1), ("qwen3", 5)])  # the decoder's ~200-token prompts: a sample
def test_a_batch_of_100_documents_equals_them_one_by_one(engine: Engine, name: str, every: int) -> None:
    docs = tuple(f"document {i} " + "about the river " * (i % 5) + "and the bridge" * (i % 2) for i in range(100))
    together = scores(rerank(engine, name, docs))
    # One at a time, each pass unpadded; lengths vary, so the batch's rows were padded to different widths.
    alone = np.array([scores(rerank(engine, name, (d,)))[0] for d in docs[::every]])
    np.testing.assert_allclose(together[::every], alone, atol=1e-5)
    assert len(set(np.round(together, 4))) > 10


def test_truncation_cuts_the_document_and_keeps_the_query(engine: Engine, dirs: dict[str, Path]) -> None:
    files = engine.preparer.files("bert")
    tokenizer = files.tokenizer.tokenizer
    query_ids = tokenizer.encode(QUERY, add_special_tokens=False).ids
    long_doc = " ".join(["river stone bridge"] * 20)
    for num_ctx in (None, 20):
        prepared = prepare_rerank(files, RerankRequest(model="bert", query=QUERY, documents=(long_doc, "ok"),
                                                       num_ctx=num_ctx))
        pair = prepared.inputs[0]
        assert len(pair) == (num_ctx or MAX_TOKENS)
        assert pair[1 : 1 + len(query_ids)] == query_ids  # [CLS] query [SEP] document… [SEP]
        assert pair[-1] == tokenizer.token_to_id("[SEP]") and prepared.firsts[0] == len(query_ids) + 2
        assert len(prepared.inputs[1]) < len(pair)  # a short document is not padded or cut
    got = scores(rerank(engine, "bert", (long_doc,)))
    np.testing.assert_allclose(got, reference(engine, "bert", dirs["bert"], (long_doc,)), atol=1e-4)
    # The decoder's prompt: its prefix and suffix whole, the body cut from the document's end.
    qfiles = engine.preparer.files("qwen3")
    long_q = prepare_rerank(qfiles, RerankRequest(model="qwen3", query=QUERY, documents=(long_doc * 4,)))
    assert len(long_q.inputs[0]) == QWEN3_POSITIONS
    ref = Qwen3RerankerReference(dirs["qwen3"])
    assert long_q.inputs[0] == ref.encode(QUERY, long_doc * 4, QWEN3_POSITIONS)
    # A query that leaves no room for any document is refused, never cut.
    too_long = rerank(engine, "bert", ("ok",), query=" ".join(["river"] * 40)).wait()
    assert isinstance(too_long, Failed) and isinstance(too_long.error, BadRequest)
    assert "the query takes" in too_long.error.message


def test_models_that_cannot_rerank_refuse_and_rerankers_do_not_chat_or_embed(engine: Engine) -> None:
    for name in ("llm", "embedder"):
        end = rerank(engine, name, ("a",)).wait()
        assert isinstance(end, Failed) and isinstance(end.error, BadRequest)
        assert end.error.message == f'"{name}" does not support rerank'
    for name in ("bert", "qwen3"):
        chat = submit(engine, name, "hello").wait()
        assert isinstance(chat, Failed) and chat.error.message == f'"{name}" does not support generate'
        w = Waiter(EmbedRequest(model=name, inputs=("hello",)))  # type: ignore[arg-type]
        engine.submit(w.request, w)
        embed = w.wait()
        assert isinstance(embed, Failed) and embed.error.message == f'"{name}" does not support embeddings'
    assert scores(rerank(engine, "bert", ())).shape == (0,)  # nothing to score: an empty answer
    nli = rerank(engine, "nli", ("a",)).wait()
    assert isinstance(nli, Failed) and "classifier has one label; this one has 3" in nli.error.message


def test_a_large_rerank_runs_in_slices_beside_a_stream(dirs: dict[str, Path], tiny_llama: Path,
                                                       tmp_path: Path) -> None:
    e = Engine(make_config(tmp_path, {"rr": {"source": str(dirs["bert"])}, "llm": {"source": str(tiny_llama)}},
                           prefill_slice=0.005, prefill_chunk=64))
    e.start()
    try:
        scores(rerank(e, "rr", ("warm up",)))
        stream = submit(e, "llm", "one two", sampling=SamplingParams(temperature=0.0), max_tokens=100000)
        stream.first_delta()
        slices = e.status().counters.prefill_slices
        big = rerank(e, "rr", tuple(f"passage {i} on rivers and the stone bridge" for i in range(300)))
        assert isinstance(big.events.get(timeout=60), Started)
        before = tokens_so_far(stream)
        assert scores(big).shape == (300,)
        during = tokens_so_far(stream) - before
        slices = e.status().counters.prefill_slices - slices
        e.cancel(stream.request.request_id)
        stream.wait()
    finally:
        e.stop()
    assert slices > 10 and during >= slices // 2  # a decode step between (nearly) every two slices
