"""The embedded demo embedding model end to end: all-MiniLM-L6-v2 from its PyPI package, served by the real engine
as `all-minilm`, through the official `ollama` and `openai` clients and LangChain's `OllamaEmbeddings` — every
route and encoding must give the vectors of an independent reference to cosine ≥ 0.9999.

The reference is tests/support/embed_reference.py (a numpy float64 BERT forward pass written from the Hugging Face
definitions) fed by the `tokenizers` library directly, so neither tokenization nor the forward pass shares code
with the server. The CPU MLX backend is slow: a handful of short texts only.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import ollama
import openai
import pytest
from langchain_ollama import OllamaEmbeddings
from tokenizers import Tokenizer

from support.embed_reference import ReferenceEncoder, cosine
from mlx_server.models.sources import extract_zip, resolve_package_file
from support.serving import Server, make_config, serve

MINILM = "package:all_minilm_l6_v2/model.zip"
MODEL = "all-minilm"
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "What is the capital of France?", "ok"]
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
COSINE = 0.9999


class Reference:
    """all-MiniLM-L6-v2 embedded the slow obvious way: HF tokenizer (specials added, cut at 256 keeping them),
    float64 forward pass, mean pooling, L2 normalization."""

    def __init__(self, model_dir: Path) -> None:
        self.encoder = ReferenceEncoder(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()  # the file pads every input to 128; sentence-transformers does not
        self.tokenizer.enable_truncation(MAX_TOKENS)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def __call__(self, text: str, dimensions: int | None = None) -> np.ndarray:
        v = self.encoder.embed(self.ids(text), "mean")[:dimensions]
        return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(extract_zip(resolve_package_file(MINILM), tmp_path_factory.mktemp("minilm-reference")))


@pytest.fixture(scope="module")
def expected(reference: Reference) -> np.ndarray:
    return np.array([reference(t) for t in TEXTS])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("embed-clients"), {MODEL: {"source": MINILM}})
    with serve(config) as s:
        yield s


def assert_same(got: object, want: np.ndarray, normalized: bool = True) -> None:
    vectors = np.asarray(got, dtype=np.float64)
    assert vectors.shape == want.shape
    for i, (g, w) in enumerate(zip(vectors, want)):
        assert cosine(g, w) >= COSINE, (i, cosine(g, w))
        norm = float(np.linalg.norm(g))
        assert (abs(norm - 1.0) < 1e-4) == normalized, norm  # /api/embed normalizes; legacy /api/embeddings not


def test_ollama_client(server: Server, reference: Reference, expected: np.ndarray) -> None:
    client = ollama.Client(host=server.url)
    batch = client.embed(model=MODEL, input=TEXTS)
    assert_same(batch.embeddings, expected)
    assert batch.model == MODEL and batch.prompt_eval_count == sum(len(reference.ids(t)) for t in TEXTS)
    assert isinstance(batch.total_duration, int) and batch.total_duration > 0
    assert_same(client.embed(model=MODEL, input=TEXTS[1]).embeddings, expected[1:2])
    assert_same([client.embeddings(model=MODEL, prompt=TEXTS[2]).embedding], expected[2:3], normalized=False)


def test_openai_client_float_and_base64(server: Server, expected: np.ndarray) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    as_floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert_same([d.embedding for d in as_floats.data], expected)
    assert as_floats.usage.prompt_tokens > 0 and as_floats.model == MODEL
    raw = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64")
    assert_same([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data], expected)
    decoded = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64 and decodes it
    assert_same([d.embedding for d in decoded.data], expected)


def test_langchain_ollama_embeddings(server: Server, expected: np.ndarray) -> None:
    embedder = OllamaEmbeddings(model=MODEL, base_url=server.url)
    assert_same(embedder.embed_documents(TEXTS), expected)
    assert_same([embedder.embed_query(TEXTS[0])], expected[:1])


def test_dimensions_and_truncation(server: Server, reference: Reference) -> None:
    client = ollama.Client(host=server.url)
    cut = client.embed(model=MODEL, input=TEXTS[:2], dimensions=64)
    assert_same(cut.embeddings, np.array([reference(t, 64) for t in TEXTS[:2]]))
    long = " ".join(["riverbank"] * 300)  # over 256 tokens
    assert len(reference.tokenizer.encode(long).ids) == MAX_TOKENS  # the reference cuts it too
    assert_same(client.embed(model=MODEL, input=[TEXTS[0], long]).embeddings,
                np.array([reference(TEXTS[0]), reference(long)]))
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input=[TEXTS[0], long], truncate=False)
    assert err.value.status_code == 400 and "1" in err.value.error  # names the input's index
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input="x", dimensions=385)
    assert err.value.status_code == 400


def test_show_and_no_generation(server: Server) -> None:
    client = ollama.Client(host=server.url)
    show = client.show(MODEL)
    assert list(show.capabilities) == ["embedding"]
    assert show.modelinfo["general.architecture"] == "bert" and show.modelinfo["bert.context_length"] == MAX_TOKENS
    assert show.modelinfo["bert.embedding_length"] == 384
    r = httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json() == {"error": f'"{MODEL}" does not support chat'}
