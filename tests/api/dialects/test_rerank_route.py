"""The rerank routes (/v1/rerank, /rerank, /v2/rerank, /api/rerank): answer shape, ordering, top_n, documents as
strings or {"text"} objects, bad inputs and their error shapes per path, capabilities, and rerankers refusing
to chat — over a FakeEngine (milliseconds); then Open WebUI's external reranker request, byte for byte, against a
real server on a tiny BERT cross-encoder, and its scores against a numpy forward pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import numpy as np
import pytest

from mlx_server.api.openapi import request_schema
from mlx_server.contract.requests import RerankRequest
from support.fakeengine import FakeEngine, fake_model
from support.rerank_reference import CrossEncoderReference
from support.serving import Server, make_config, serve
from support.tinyrerankers import build_tiny_cross_encoder

PATHS = ["/v1/rerank", "/rerank", "/v2/rerank", "/api/rerank"]
QUERY = "where does the river run"
DOCS = ["the cat sat on the mat", "the river runs under the bridge", "where does it run", "nothing here"]


def cross_encoder_dir(path: Path) -> Path:
    """A cross-encoder's config (no weights worth loading: the engine is fake)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"},
        "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "max_position_embeddings": 512}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("rerank-routes")
    config = make_config(tmp, {"rr": {"source": str(cross_encoder_dir(tmp / "ce")), "aliases": ["reranker"]},
                               "llm": {"source": str(fake_model(tmp / "llm", "{{ messages }}"))}})
    with serve(config, engine=FakeEngine()) as s:
        yield s


@pytest.fixture(scope="module")
def client(fake: Server) -> Iterator[httpx.Client]:
    with fake.client() as c:
        yield c


def engine_of(server: Server) -> FakeEngine:
    return server.engine


@pytest.mark.parametrize("path", PATHS)
def test_answer_is_sorted_by_score_with_documents(client: httpx.Client, fake: Server, path: str) -> None:
    body = {"model": "reranker", "query": QUERY, "documents": DOCS}
    jsonschema.validate(body, request_schema(path))
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["id"].startswith("rerank-") and data["model"] == "reranker"
    # FakeEngine's score: the share of the query's words a document has.
    assert [x["index"] for x in data["results"]] == [2, 1, 0, 3]
    assert [x["relevance_score"] for x in data["results"]] == pytest.approx([0.6, 0.4, 0.2, 0.0])
    assert [x["document"]["text"] for x in data["results"]] == [DOCS[i] for i in (2, 1, 0, 3)]
    assert data["usage"]["total_tokens"] == sum(len(QUERY.split()) + len(d.split()) for d in DOCS)
    sent = engine_of(fake).last
    assert isinstance(sent, RerankRequest) and sent.model == "rr" and sent.documents == tuple(DOCS)


def test_top_n_objects_and_return_documents(client: httpx.Client, fake: Server) -> None:
    def ask(**extra: Any) -> list[dict[str, Any]]:
        body = {"model": "rr", "query": QUERY, "documents": DOCS, **extra}
        jsonschema.validate(body, request_schema("/v1/rerank"))
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 200, r.text
        return r.json()["results"]

    assert [x["index"] for x in ask(top_n=2)] == [2, 1]
    assert len(ask(top_n=0)) == len(ask(top_n=99)) == len(DOCS)  # 0 or more than there are: all (vLLM's reading)
    assert all("document" not in x for x in ask(return_documents=False))
    cohere = ask(documents=[{"text": d} for d in DOCS], top_n=1, instruction="find rivers")
    assert cohere == [{"index": 2, "relevance_score": pytest.approx(0.6), "document": {"text": DOCS[2]}}]
    assert engine_of(fake).last.instruction == "find rivers"  # type: ignore[union-attr]


def openai_error(r: httpx.Response) -> str:
    err = r.json()["error"]
    assert isinstance(err, dict) and err["type"] == "invalid_request_error", r.text
    return str(err["message"])


def error_message(path: str, r: httpx.Response) -> str:
    if path == "/api/rerank":  # Ollama's shape
        assert isinstance(r.json()["error"], str), r.text
        return str(r.json()["error"])
    return openai_error(r)


BAD = [
    ({"query": QUERY, "documents": [1, "a"]}, "invalid document at index 0"),
    ({"query": QUERY, "documents": ["a", None]}, "invalid document at index 1"),
    ({"query": QUERY, "documents": [{"txt": "a"}]}, "invalid document at index 0"),
    ({"query": QUERY, "documents": [{"text": 5}]}, "invalid document at index 0"),
    ({"documents": ["a"]}, '"query" is required'),
    ({"query": 3, "documents": ["a"]}, '"query" is required'),
    ({"query": QUERY}, '"documents" is required'),
    ({"query": QUERY, "documents": "a"}, '"documents" is required'),
    ({"query": QUERY, "documents": ["a"], "top_n": -1}, '"top_n": must not be negative'),
    ({"query": QUERY, "documents": ["a"], "top_n": "3"}, '"top_n": expected an integer'),
    ({"query": QUERY, "documents": ["a"], "top_n": True}, '"top_n": expected an integer'),
    ({"query": QUERY, "documents": ["a"], "return_documents": "yes"}, '"return_documents": expected a boolean'),
]


@pytest.mark.parametrize("path", PATHS)
def test_bad_inputs_are_400_in_the_paths_shape(client: httpx.Client, fake: Server, path: str) -> None:
    before = len(engine_of(fake).requests)
    for body, message in BAD:
        r = client.post(path, json={"model": "rr", **body})
        assert r.status_code == 400, (body, r.text)
        assert message in error_message(path, r), (body, r.text)
    r = client.post(path, json={"query": QUERY, "documents": ["a"]})
    assert r.status_code == 400 and "model" in error_message(path, r)
    r = client.post(path, json={"model": "nope", "query": QUERY, "documents": ["a"]})
    assert r.status_code == 404 and 'model "nope" not found' in error_message(path, r).replace("\\", "")
    assert len(engine_of(fake).requests) == before  # none of them reached the engine
    r = client.get(path)
    assert r.status_code == 405 and error_message(path, r)


def test_no_documents_answer_no_results_unless_the_model_cannot_rerank(client: httpx.Client, fake: Server) -> None:
    before = len(engine_of(fake).requests)
    r = client.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": []})
    assert r.status_code == 200 and r.json()["results"] == [] and r.json()["usage"]["total_tokens"] == 0
    assert len(engine_of(fake).requests) == before  # nothing to score: the model is not even asked
    r = client.post("/v1/rerank", json={"model": "llm", "query": QUERY, "documents": []})
    assert r.status_code == 400 and openai_error(r) == '"llm" does not support rerank'


def test_a_reranker_shows_its_capability_and_does_not_chat(client: httpx.Client) -> None:
    show = client.post("/api/show", json={"model": "rr"})
    assert show.status_code == 200 and show.json()["capabilities"] == ["rerank"]
    r = client.post("/api/chat", json={"model": "rr", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"] == '"rr" does not support chat'
    r = client.post("/v1/chat/completions", json={"model": "rr", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and openai_error(r) == '"rr" does not support chat'


# ---- a real server, a real (tiny) reranker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("rerank-live")
    reranker = build_tiny_cross_encoder(tmp / "bge-reranker-tiny", arch="xlm-roberta", seed=5)
    config = make_config(tmp, {"bge-reranker-tiny": {"source": str(reranker)}, "llm": {"source": str(tiny_llama)}},
                         api_key="sk-test")
    with serve(config) as s:
        yield s, reranker


def test_open_webui_external_reranker_request(live: tuple[Server, Path]) -> None:
    server, path = live
    documents = ["The river runs under the old stone bridge.", "Hello world.", "Where does the river run? North.",
                 "Stone bridges are old."]
    # open_webui/retrieval/models/external.py ExternalReranker.predict: this payload, these headers, then the
    # results sorted by index and their relevance_score read, one per document.
    payload = {"model": "bge-reranker-tiny", "query": QUERY, "documents": documents, "top_n": len(documents)}
    r = httpx.post(f"{server.url}/v1/rerank", json=payload, timeout=60,
                   headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test"})
    r.raise_for_status()
    data = r.json()
    assert "results" in data
    scores = [result["relevance_score"] for result in sorted(data["results"], key=lambda x: x["index"])]
    assert len(scores) == len(documents)
    ref = CrossEncoderReference(path)
    np.testing.assert_allclose(scores, [ref.score(QUERY, d, 24) for d in documents], atol=1e-4)
    assert [x["relevance_score"] for x in data["results"]] == sorted(scores, reverse=True)

    refused = httpx.post(f"{server.url}/v1/rerank", json={**payload, "model": "llm"}, timeout=60,
                         headers={"Authorization": "Bearer sk-test"})
    assert refused.status_code == 400 and openai_error(refused) == '"llm" does not support rerank'
    chat = httpx.post(f"{server.url}/api/chat", timeout=60, headers={"Authorization": "Bearer sk-test"},
                      json={"model": "bge-reranker-tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"] == '"bge-reranker-tiny" does not support chat'
