"""ollama-python's create / create_blob / copy / delete against a real server on the real engine and tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import ollama
import pytest

from support.gguf_builders import tiny_llama_gguf
from support.serving import Server, make_config, serve

PROMPT = [{"role": "user", "content": "Say something."}]
PIRATE = "You are a pirate. Answer every question as a pirate would, and say arr."
GREEDY = {"temperature": 0, "num_predict": 6, "seed": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, Any]:
    tmp = tmp_path_factory.mktemp("create-api")
    config = make_config(tmp, {"tiny": {"source": str(tiny_llama), "aliases": ["small"]}})
    return tmp, config


@pytest.fixture(scope="module")
def server(setup: tuple[Path, Any]) -> Iterator[Server]:
    with serve(setup[1]) as s:
        yield s


def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url)


def chat(server: Server, model: str, **extra: Any) -> Any:
    return client(server).chat(model=model, messages=PROMPT, options=GREEDY, **extra)


def show(server: Server, name: str) -> dict[str, Any]:
    """/api/show's JSON (ollama-python's ShowResponse has no `system` field; Ollama's reply has one)."""
    r = httpx.post(f"{server.url}/api/show", json={"model": name})
    assert r.status_code == 200, r.text
    return r.json()


def upload(server: Server, directory: Path) -> dict[str, str]:
    return {p.name: client(server).create_blob(p) for p in sorted(directory.iterdir()) if p.is_file()}


def test_from_a_model_with_a_system_prompt_changes_the_answer_and_shares_the_weights(server: Server) -> None:
    progress = list(client(server).create(model="pirate", from_="tiny", system=PIRATE, parameters={"num_predict": 3},
                                          stream=True))
    assert [p.status for p in progress][-1] == "success"
    assert any(p.status == "using existing model tiny" for p in progress)
    base, pirate = chat(server, "tiny"), chat(server, "pirate")
    assert pirate.prompt_eval_count > base.prompt_eval_count  # the system prompt is in the prompt
    assert pirate.message.content != base.message.content
    shown = client(server).show("pirate")
    assert show(server, "pirate")["system"] == PIRATE and f'SYSTEM """{PIRATE}"""' in (shown.modelfile or "")
    assert shown.modelfile.splitlines()[1] == f"FROM {client(server).show('tiny').modelfile.splitlines()[1][5:]}"
    assert "num_predict 3" in (shown.parameters or "")
    # parameters become the model's defaults: 3 tokens unless the request says otherwise
    assert client(server).chat(model="pirate", messages=PROMPT, options={"temperature": 0}).eval_count <= 3
    assert "pirate:latest" in [m.model for m in client(server).list().models]


def test_messages_and_a_jinja_template_are_layers_of_the_new_model(server: Server, tiny_llama: Path) -> None:
    client(server).create(model="fewshot", from_="tiny",
                          messages=[{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"}])
    assert chat(server, "fewshot").prompt_eval_count > chat(server, "tiny").prompt_eval_count
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
               "<|im_start|>assistant\n"
    client(server).create(model="plain", from_="tiny", template=template)
    assert client(server).show("plain").template == template
    own = chat(server, "tiny").prompt_eval_count
    assert chat(server, "plain").prompt_eval_count != own  # a different template renders a different prompt
    with pytest.raises(ollama.ResponseError) as err:
        client(server).create(model="go", from_="tiny", template="{{ .System }} {{ .Prompt }}")
    assert err.value.status_code == 400 and "Go templates are not rendered" in err.value.error


def test_uploaded_safetensors_serve_the_same_weights(server: Server, tiny_llama: Path) -> None:
    files = upload(server, tiny_llama)
    assert set(files) >= {"config.json", "model.safetensors", "tokenizer.json"}
    client(server).create(model="uploaded:v1", files=files)
    assert chat(server, "uploaded:v1").message.content == chat(server, "tiny").message.content
    assert client(server).show("uploaded:v1").capabilities == client(server).show("tiny").capabilities


def test_quantize_q8_0_makes_an_8_bit_model(server: Server, tiny_llama: Path) -> None:
    lines = list(client(server).create(model="tiny-q8", files=upload(server, tiny_llama), quantize="q8_0",
                                       stream=True))
    statuses = [p.status for p in lines]
    assert statuses[-1] == "success" and any("8-bit" in s and "q8_0" in s for s in statuses if s)
    source = Path(client(server).show("tiny-q8").modelfile.splitlines()[1][5:])
    assert json.loads((source / "config.json").read_text())["quantization"]["bits"] == 8
    assert chat(server, "tiny-q8").eval_count > 0
    with pytest.raises(ollama.ResponseError) as err:  # already quantized
        client(server).create(model="twice", from_="tiny-q8", quantize="q4")
    assert "already quantized" in err.value.error


def test_a_gguf_upload_is_imported(server: Server, tmp_path: Path) -> None:
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    lines = list(client(server).create(model="from-gguf", files={"tiny.gguf": client(server).create_blob(gguf)},
                                       quantize="q4_K_M", stream=True))
    statuses = [p.status for p in lines]
    assert "parsing GGUF" in statuses and statuses[-1] == "success"
    assert any("keeps its own quantization" in s for s in statuses if s)
    assert chat(server, "from-gguf").eval_count > 0


def test_copy_then_delete_leaves_the_original(server: Server) -> None:
    client(server).create(model="orig", from_="tiny", system="Be brief.")
    assert client(server).copy("orig", "dup").status == "success"
    assert show(server, "dup")["system"] == "Be brief."
    assert client(server).copy("small", "of-yaml").status == "success"  # an alias of a models.yaml model
    assert chat(server, "of-yaml").message.content == chat(server, "tiny").message.content
    assert client(server).delete("dup").status == "success"
    names = [m.model for m in client(server).list().models]
    assert "dup:latest" not in names and "orig:latest" in names and "tiny" in names
    with pytest.raises(ollama.ResponseError) as err:
        client(server).chat(model="dup", messages=PROMPT)
    assert err.value.status_code == 404


def test_names_models_yaml_gives_cannot_be_replaced(server: Server) -> None:
    for name in ("tiny", "small", "tiny:latest"):
        with pytest.raises(ollama.ResponseError) as err:
            client(server).create(model=name, from_="tiny", system="x")
        assert err.value.status_code == 409 and "cannot be replaced" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            client(server).copy("tiny", name)
        assert err.value.status_code in (400, 409)


def test_bad_create_requests(server: Server) -> None:
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/api/create", json={"model": "x"}).status_code == 400  # neither from nor files
        r = c.post("/api/create", json={"model": "x", "from": "nowhere"})
        assert r.status_code == 404 and r.json() == {"error": 'model "nowhere" not found'}
        r = c.post("/api/create", json={"model": "x", "files": {"model.gguf": "sha256:" + "0" * 64}})
        assert r.status_code == 400 and "has not been uploaded" in r.json()["error"]
        r = c.post("/api/create", json={"model": "x", "files": {"model.gguf": "md5:abc"}})
        assert r.status_code == 400
        r = c.post("/api/create", json={"model": "bad name!", "from": "tiny"})
        assert r.status_code == 400 and "invalid model name" in r.json()["error"]
        r = c.post("/api/create", json={"model": "x", "from": "tiny", "quantize": "q7_Z"})
        assert r.status_code == 400 and "q8_0" in r.json()["error"]
        r = c.post("/api/create", json={"model": "x", "from": "tiny", "messages": [{"role": "robot"}]})
        assert r.status_code == 400
        assert c.post("/api/copy", json={"source": "nowhere", "destination": "y"}).status_code == 404
        assert c.post("/api/copy", json={"source": "tiny"}).status_code == 400


def test_created_models_survive_a_restart(tmp_path: Path, tiny_llama: Path) -> None:
    models = {"tiny": {"source": str(tiny_llama)}}
    with serve(make_config(tmp_path, models)) as first:
        client(first).create(model="keeper", from_="tiny", system="Remember me.")
        client(first).copy("keeper", "keeper-copy")
    with serve(make_config(tmp_path, models)) as again:  # a new process's view: the same cache dir, a new app
        assert show(again, "keeper")["system"] == "Remember me."
        assert show(again, "keeper-copy")["system"] == "Remember me."
        assert chat(again, "keeper").eval_count > 0
        assert client(again).delete("keeper").status == "success"
    with serve(make_config(tmp_path, models)) as third:
        assert {m.model for m in client(third).list().models} == {"tiny", "keeper-copy:latest"}


def test_from_a_model_in_the_ollama_store_keeps_its_layers(tmp_path: Path, tiny_llama: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from support.ollama_store import add_model

    root = tmp_path / "ollama"
    add_model(root, "storemodel:1b", tiny_llama_gguf(tmp_path / "s.gguf"), params={"temperature": 0.3},
              system="Be brief.")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    with serve(make_config(tmp_path, {"tiny": {"source": str(tiny_llama)}})) as s:
        client(s).create(model="mine", from_="storemodel:1b", parameters={"num_predict": 2})
        shown = show(s, "mine")
        assert shown["system"] == "Be brief." and shown["modelfile"].splitlines()[1] == "FROM ollama:storemodel:1b"
        assert "temperature 0.3" in shown["parameters"] and "num_predict 2" in shown["parameters"]
        assert chat(s, "mine").eval_count > 0
