"""The embedding routes over a FakeEngine: every request and answer shape, errors in each dialect's shape,
capabilities in /api/show, and generation refused for embedding-only models.

A real uvicorn server runs the real app; only the engine is fake (tests/support/fakeengine.py answers deterministic unit
vectors, `fake_vectors`), so each case takes milliseconds. The real engine on all-MiniLM-L6-v2 through the official
clients is tested in test_embed_clients.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import numpy as np
import ollama
import openai
import pytest

from support.fakeengine import FAKE_CONTEXT, FAKE_WIDTH, FakeEngine, fake_vectors
from mlx_server.api.dialects.embeddings import dumps
from mlx_server.contract.errors import ServerBusy
from mlx_server.contract.requests import EmbedRequest, LoadRequest, Priority, UnloadRequest
from support.serving import Server, make_config, serve

MAX_BODY = 64 * 1024
TEXTS = ["the cat sat", "on the mat", "a third text"]


def llama_dir(path: Path) -> Path:
    """A generation model's files (no weights worth loading: the engine is fake)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 1, "max_position_embeddings": 512}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if tools %}{% endif %}{{ messages }}"}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def bert_dir(path: Path) -> Path:
    """A sentence-transformers checkpoint's files: BERT, mean pooling, inputs cut at 128 of its 512 positions."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": FAKE_WIDTH, "num_hidden_layers": 1,
        "num_attention_heads": 1, "max_position_embeddings": 512, "torch_dtype": "float32"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": FAKE_WIDTH,
                                                                 "pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("embed-models")
    return {"bert": bert_dir(tmp / "bert"), "llama": llama_dir(tmp / "llama")}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("embeddings"), {
        "embedder": {"source": str(dirs["bert"]), "aliases": ["emb"]},
        "ctx32": {"source": str(dirs["bert"]), "options": {"num_ctx": 32}, "context_length": 64},
        "long": {"source": str(dirs["bert"]), "context_length": 4096},
        "forced": {"source": str(dirs["llama"]), "kind": "embedding"},  # models.yaml says what the files don't
        "plain": {"source": str(dirs["llama"])},
    }, max_body_bytes=MAX_BODY)
    with serve(config, engine=FakeEngine()) as s:
        yield s


def post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=10, **kw)


def embed_request(engine: FakeEngine) -> EmbedRequest:
    assert len(engine.requests) == 1, engine.requests
    req = engine.last
    assert isinstance(req, EmbedRequest), req
    return req


def floats(rows: Any) -> np.ndarray:
    # JSON carries each float32 exactly (as a double), so the round trip is lossless
    return np.array(rows, dtype=np.float64).astype(np.float32)


# ---- /api/embed -------------------------------------------------------------------------------------------------


def test_embed_shape_and_vectors(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/embed", {"model": "embedder", "input": TEXTS})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == "embedder"
    np.testing.assert_array_equal(floats(body["embeddings"]), fake_vectors(TEXTS))
    # the engine's seconds as Ollama's integer nanoseconds; every input's tokens counted
    assert body["total_duration"] == 1_000_000_000 and body["load_duration"] == 250_000_000
    assert body["prompt_eval_count"] == 9
    req = embed_request(engine)
    assert (req.model, req.inputs, req.truncate, req.dimensions, req.num_ctx, req.keep_alive) == \
        ("embedder", tuple(TEXTS), True, None, None, None)


def test_embed_with_the_ollama_client(server: Server, engine: FakeEngine) -> None:
    client = ollama.Client(host=server.url)
    many = client.embed(model="emb", input=TEXTS)  # an alias: answered under the name asked for
    assert many.model == "emb" and isinstance(many.total_duration, int) and many.prompt_eval_count == 9
    np.testing.assert_array_equal(floats(many.embeddings), fake_vectors(TEXTS))
    one = client.embed(model="embedder", input="just one")
    np.testing.assert_array_equal(floats(one.embeddings), fake_vectors(["just one"]))
    assert [r.model for r in engine.requests] == ["embedder", "embedder"]
    legacy = client.embeddings(model="embedder", prompt="just one")
    np.testing.assert_array_equal(floats(legacy.embedding), fake_vectors(["just one"])[0])


def test_embed_passes_every_setting_through(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/embed", {"model": "embedder", "input": TEXTS, "truncate": False, "dimensions": 4,
                                    "keep_alive": "10m", "options": {"num_ctx": 64, "temperature": 0.1}},
             headers={"x-request-priority": "high"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(floats(r.json()["embeddings"]), fake_vectors(TEXTS, 4))
    req = embed_request(engine)
    assert (req.truncate, req.dimensions, req.keep_alive, req.num_ctx, req.priority) == \
        (False, 4, 600.0, 64, Priority.HIGH)


def test_num_ctx_from_models_yaml_unless_the_request_sets_it(server: Server, engine: FakeEngine) -> None:
    assert post(server, "/api/embed", {"model": "ctx32", "input": "x"}).status_code == 200
    assert post(server, "/api/embed", {"model": "ctx32", "input": "x", "options": {"num_ctx": 8}}).status_code == 200
    assert post(server, "/v1/embeddings", {"model": "ctx32", "input": "x"}).status_code == 200
    assert [r.num_ctx for r in engine.requests] == [32, 8, 32]


def test_generation_models_embed_too(server: Server, engine: FakeEngine) -> None:
    # Ollama's behaviour: any model embeds; only generation asks what a model can do
    r = post(server, "/api/embed", {"model": "plain", "input": "hello"})
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1
    assert embed_request(engine).model == "plain"


@pytest.mark.parametrize("body", [{}, {"input": ""}, {"input": []}, {"input": None}])
def test_embed_nothing_answers_empty_without_the_engine(server: Server, engine: FakeEngine,
                                                        body: dict[str, Any]) -> None:
    r = post(server, "/api/embed", {"model": "embedder", **body})
    assert r.status_code == 200 and r.json()["embeddings"] == [] and r.json()["model"] == "embedder"
    assert engine.requests == []
    # the model is still resolved: an unknown one is a 404 even with nothing to embed
    assert post(server, "/api/embed", {"model": "nope", **body}).status_code == 404


def test_an_empty_text_in_a_list_is_embedded(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/embed", {"model": "embedder", "input": ["", "x"]})
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2
    assert embed_request(engine).inputs == ("", "x")


# ---- /api/embeddings (legacy) -----------------------------------------------------------------------------------


def test_legacy_embeddings(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/embeddings", {"model": "embedder", "prompt": "hello there", "keep_alive": 30,
                                         "options": {"num_ctx": 16}})
    assert r.status_code == 200 and set(r.json()) == {"embedding"}
    np.testing.assert_array_equal(floats(r.json()["embedding"]), fake_vectors(["hello there"])[0])
    req = embed_request(engine)
    assert (req.inputs, req.keep_alive, req.num_ctx, req.truncate) == (("hello there",), 30.0, 16, True)


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": None}])
def test_legacy_empty_prompt_is_an_empty_embedding(server: Server, engine: FakeEngine, body: dict[str, Any]) -> None:
    r = post(server, "/api/embeddings", {"model": "embedder", **body})
    assert r.status_code == 200 and r.json() == {"embedding": []}
    assert engine.requests == []


# ---- /v1/embeddings ---------------------------------------------------------------------------------------------


def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_openai_float_shape(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/v1/embeddings", {"model": "emb", "input": TEXTS, "encoding_format": "float", "user": "u1"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list" and body["model"] == "emb"
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    np.testing.assert_array_equal(floats([d["embedding"] for d in body["data"]]), fake_vectors(TEXTS))
    assert embed_request(engine).model == "embedder"


def test_openai_base64_decodes_to_the_same_floats(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/v1/embeddings", {"model": "embedder", "input": TEXTS, "encoding_format": "base64"})
    assert r.status_code == 200
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_array_equal(decoded, fake_vectors(TEXTS))


def test_openai_client_both_encodings(server: Server, engine: FakeEngine) -> None:
    client = oai(server)
    as_floats = client.embeddings.create(model="embedder", input=TEXTS, encoding_format="float")
    # without encoding_format the SDK asks for base64 and decodes it itself
    default = client.embeddings.create(model="embedder", input=TEXTS)
    raw = client.embeddings.create(model="embedder", input=TEXTS, encoding_format="base64")
    want = fake_vectors(TEXTS)
    np.testing.assert_array_equal(floats([d.embedding for d in as_floats.data]), want)
    np.testing.assert_array_equal(floats([d.embedding for d in default.data]), want)
    np.testing.assert_array_equal(
        np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]), want)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == 9
    assert [r.model for r in engine.requests] == ["embedder"] * 3


def test_openai_token_ids_and_dimensions(server: Server, engine: FakeEngine) -> None:
    client = oai(server)
    one = client.embeddings.create(model="embedder", input=[5, 6, 7], dimensions=3, encoding_format="float")
    many = client.embeddings.create(model="embedder", input=[[5, 6], [7]], encoding_format="float")
    assert [r.inputs for r in engine.requests] == [((5, 6, 7),), ((5, 6), (7,))]
    assert [r.dimensions for r in engine.requests] == [3, None]
    np.testing.assert_array_equal(floats([d.embedding for d in one.data]), fake_vectors([(5, 6, 7)], 3))
    np.testing.assert_array_equal(floats([d.embedding for d in many.data]), fake_vectors([(5, 6), (7,)]))


def test_openai_single_string_even_empty(server: Server, engine: FakeEngine) -> None:
    # Ollama's OpenAI layer embeds "" as one input
    r = post(server, "/v1/embeddings", {"model": "embedder", "input": ""})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    assert embed_request(engine).inputs == ("",)


# ---- bad requests: 400 in each dialect's shape, nothing reaches the engine -------------------------------------


OLLAMA_BAD = [
    ("/api/embed", {"input": [1, 2]}, "invalid input type"),
    ("/api/embed", {"input": ["a", 1]}, "invalid input type"),
    ("/api/embed", {"input": {"text": "a"}}, "invalid input type"),
    ("/api/embed", {"input": 5}, "invalid input type"),
    ("/api/embed", {"input": [["a"]]}, "invalid input type"),
    ("/api/embed", {"input": "a", "truncate": "yes"}, "truncate"),
    ("/api/embed", {"input": "a", "dimensions": 0}, "dimensions"),
    ("/api/embed", {"input": "a", "dimensions": -3}, "dimensions"),
    ("/api/embed", {"input": "a", "dimensions": "4"}, "dimensions"),
    ("/api/embed", {"input": "a", "dimensions": 1.5}, "dimensions"),
    ("/api/embed", {"input": "a", "dimensions": True}, "dimensions"),
    ("/api/embed", {"input": "a", "keep_alive": "soon"}, "keep_alive"),
    ("/api/embed", {"input": "a", "options": "fast"}, "options"),
    ("/api/embed", {"input": "a", "options": {"num_ctx": "big"}}, "num_ctx"),
    ("/api/embed", {"input": "a", "options": {"num_ctx": 0}}, "num_ctx"),
    ("/api/embeddings", {"prompt": ["a"]}, "prompt"),
    ("/api/embeddings", {"prompt": "a", "keep_alive": []}, "keep_alive"),
]


@pytest.mark.parametrize("path,body,says", OLLAMA_BAD)
def test_ollama_bad_requests(server: Server, engine: FakeEngine, path: str, body: dict[str, Any], says: str) -> None:
    r = post(server, path, {"model": "embedder", **body})
    assert r.status_code == 400 and set(r.json()) == {"error"} and says in r.json()["error"], r.text
    assert engine.requests == []


@pytest.mark.parametrize("path", ["/api/embed", "/api/embeddings"])
def test_ollama_model_required(server: Server, path: str) -> None:
    for body in ({"input": "a"}, {"model": "", "prompt": "a"}, {"model": 3, "input": "a"}):
        r = post(server, path, body)
        assert r.status_code == 400 and r.json() == {"error": "model is required"}


OPENAI_BAD = [
    {"model": "embedder", "input": []},  # OpenAI and Ollama's OpenAI layer both refuse an empty array
    {"model": "embedder", "input": [1, "a"]},
    {"model": "embedder", "input": [[1], ["a"]]},
    {"model": "embedder", "input": [[]]},
    {"model": "embedder", "input": [-1]},
    {"model": "embedder", "input": [True]},
    {"model": "embedder", "input": {"a": 1}},
    {"model": "embedder"},
    {"model": "embedder", "input": "a", "encoding_format": "hex"},
    {"model": "embedder", "input": "a", "dimensions": 0},
    {"model": "embedder", "input": "a", "dimensions": "3"},
    {"input": "a"},
]


@pytest.mark.parametrize("body", OPENAI_BAD)
def test_openai_bad_requests(server: Server, engine: FakeEngine, body: dict[str, Any]) -> None:
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert engine.requests == []


def test_openai_client_raises_bad_request_without_retrying(server: Server, engine: FakeEngine) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").embeddings.create(model="embedder", input=[])
    assert "input" in err.value.body["message"] and engine.requests == []


def test_engine_errors_in_each_dialect_shape(server: Server, engine: FakeEngine) -> None:
    # dimensions above the model's width: the engine's 400
    r = post(server, "/api/embed", {"model": "embedder", "input": "a", "dimensions": FAKE_WIDTH + 1})
    assert r.status_code == 400 and "dimensions" in r.json()["error"]
    r = post(server, "/v1/embeddings", {"model": "embedder", "input": "a", "dimensions": FAKE_WIDTH + 1})
    assert r.status_code == 400 and "dimensions" in r.json()["error"]["message"]
    # truncate false with a too-long input: the engine's 400 names the input
    long = " ".join(["word"] * (FAKE_CONTEXT + 1))
    r = post(server, "/api/embed", {"model": "embedder", "input": ["short", long], "truncate": False})
    assert r.status_code == 400 and "input 1" in r.json()["error"]
    # truncate true (the default) cuts it instead
    r = post(server, "/api/embed", {"model": "embedder", "input": ["short", long]})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == 1 + FAKE_CONTEXT


def test_refusals_and_unknown_models(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/embed", {"model": "nope", "input": "a"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found'}
    r = post(server, "/api/embeddings", {"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found'}
    r = post(server, "/v1/embeddings", {"model": "nope", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    engine.refuse = ServerBusy()
    r = post(server, "/api/embed", {"model": "embedder", "input": "a"})
    assert r.status_code == 503 and r.json() == {"error": "server busy, retry later"}
    r = post(server, "/v1/embeddings", {"model": "embedder", "input": "a"})
    assert r.status_code == 503 and r.json()["error"]["message"] == "server busy, retry later"


def test_body_over_the_limit_is_413(server: Server, engine: FakeEngine) -> None:
    big = ["x" * 1000] * (MAX_BODY // 1000 + 1)
    r = post(server, "/api/embed", {"model": "embedder", "input": big})
    assert r.status_code == 413 and "error" in r.json()
    r = post(server, "/v1/embeddings", {"model": "embedder", "input": big})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert engine.requests == []


# ---- capabilities ----------------------------------------------------------------------------------------------


def test_show_capabilities(server: Server) -> None:
    client = ollama.Client(host=server.url)
    emb = client.show("embedder")
    assert list(emb.capabilities) == ["embedding"]
    info = emb.modelinfo
    assert info["general.architecture"] == "bert"
    # inputs are cut at sentence-transformers' max_seq_length, below the model's 512 positions
    assert info["bert.context_length"] == 128 and info["bert.embedding_length"] == FAKE_WIDTH
    assert info["bert.pooling_type"] == 1  # mean, in Ollama's numbering
    assert list(client.show("emb").capabilities) == ["embedding"]
    # a configured context_length cuts shorter, never longer (the engine's rule)
    assert client.show("ctx32").modelinfo["bert.context_length"] == 64
    assert client.show("long").modelinfo["bert.context_length"] == 128
    assert list(client.show("forced").capabilities) == ["embedding"]  # models.yaml `kind: embedding`
    plain = client.show("plain")
    assert list(plain.capabilities) == ["completion", "tools"]
    assert plain.modelinfo["llama.context_length"] == 512
    # listings are unchanged: embedding models are listed like any other
    tags = httpx.get(f"{server.url}/api/tags").json()["models"]
    assert {"embedder", "plain", "forced", "emb"} <= {m["name"] for m in tags}


# ---- generation on an embedding-only model -------------------------------------------------------------------

HI = [{"role": "user", "content": "hello"}]
GENERATION = [  # (path, body, Ollama's word for the route)
    ("/api/generate", {"prompt": "hello", "stream": False}, "generate"),
    ("/api/generate", {"prompt": "hello"}, "generate"),  # streaming: refused before any line
    ("/api/chat", {"messages": HI}, "chat"),
    ("/v1/chat/completions", {"messages": HI}, "chat"),
    ("/v1/completions", {"prompt": "hello"}, "generate"),
    ("/v1/messages", {"messages": HI, "max_tokens": 5}, "chat"),
    ("/v1/messages/count_tokens", {"messages": HI}, "chat"),
]


@pytest.mark.parametrize("path,body,verb", GENERATION)
@pytest.mark.parametrize("model", ["embedder", "emb", "forced"])
def test_embedding_model_cannot_generate(server: Server, engine: FakeEngine, path: str, body: dict[str, Any],
                                         verb: str, model: str) -> None:
    r = post(server, path, {"model": model, **body})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    want = f'"{model}" does not support {verb}'
    if path.startswith("/v1/messages"):
        assert r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": want}}
    elif path.startswith("/v1/"):
        assert r.json()["error"]["message"] == want and r.json()["error"]["type"] == "invalid_request_error"
    else:
        assert r.json() == {"error": want}
    assert engine.requests == []


def test_clients_see_the_refusal(server: Server, engine: FakeEngine) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=server.url).chat(model="embedder", messages=HI)
    assert err.value.status_code == 400 and err.value.error == '"embedder" does not support chat'
    with pytest.raises(openai.BadRequestError):
        oai(server).chat.completions.create(model="embedder", messages=HI)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0).messages.create(
            model="embedder", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    assert engine.requests == []


def test_embedding_model_loads_and_unloads(server: Server, engine: FakeEngine) -> None:
    # Ollama's empty-request idioms still work (the preload command warms models this way)
    r = post(server, "/api/generate", {"model": "embedder"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    r = post(server, "/api/chat", {"model": "embedder", "messages": [], "keep_alive": 0})
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert [type(r) for r in engine.requests] == [LoadRequest, UnloadRequest]


def test_generation_models_still_generate(server: Server, engine: FakeEngine) -> None:
    r = post(server, "/api/chat", {"model": "plain", "messages": HI, "stream": False})
    assert r.status_code == 200 and r.json()["message"]["content"] == "hello"


# ---- the fallback: models not served here -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def front(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp, up_tmp = tmp_path_factory.mktemp("embed-front"), tmp_path_factory.mktemp("embed-upstream")
    with serve(make_config(up_tmp, {"up-emb": {"source": str(dirs["bert"])}}), engine=FakeEngine()) as up:
        config = make_config(tmp, {"embedder": {"source": str(dirs["bert"])}}, fallback_url=up.url)
        with serve(config, engine=FakeEngine()) as s:
            yield s, up


def test_models_not_served_here_go_to_the_fallback(front: tuple[Server, Server]) -> None:
    server, upstream = front
    for path, body in (("/api/embed", {"input": TEXTS}), ("/api/embeddings", {"prompt": "a"}),
                       ("/v1/embeddings", {"input": TEXTS})):
        r = post(server, path, {"model": "up-emb", **body})
        assert r.status_code == 200 and r.headers["x-served-by"] == "ollama", (path, r.text)
        r = post(server, path, {"model": "embedder", **body})
        assert r.status_code == 200 and r.headers["x-served-by"] == "mlx-server", (path, r.text)
    np.testing.assert_array_equal(
        floats(ollama.Client(host=server.url).embed(model="up-emb", input=TEXTS).embeddings), fake_vectors(TEXTS))
    assert all(isinstance(r, EmbedRequest) and r.model == "up-emb" for r in upstream.engine.requests)


# ---- the JSON writer ---------------------------------------------------------------------------------------------


def test_dumps_writes_vectors_exactly() -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    out = json.loads(dumps({"embeddings": list(vectors), "one": vectors[0], "n": 1, "s": "é"}))
    np.testing.assert_array_equal(floats(out["embeddings"]), vectors)
    np.testing.assert_array_equal(floats(out["one"]), vectors[0])
    assert out["n"] == 1 and out["s"] == "é"
    with pytest.raises(TypeError):
        dumps({"x": object()})
