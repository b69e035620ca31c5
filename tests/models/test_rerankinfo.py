"""rerankinfo.rerank_info: is a model dir a reranker, and how does it score (files only, no MLX); and /api/show's
capabilities for one (info.with_embedding)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Optional

import pytest

from mlx_server.models.info import ModelInfo, with_embedding
from mlx_server.models.rerankinfo import QWEN3_RERANKER, rerank_info
from mlx_server.models.sources import Located


def model_dir(path: Path, **cfg: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": 32, "max_position_embeddings": 514, **cfg}))
    return path


ONE_LABEL = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}


@pytest.mark.parametrize("model_type, arch, expected, length", [
    ("bert", "BertForSequenceClassification", "bert", 514),  # cross-encoder/ms-marco-MiniLM-L6-v2
    ("xlm-roberta", "XLMRobertaForSequenceClassification", "xlm-roberta", 512),  # BAAI/bge-reranker-v2-m3
    ("modernbert", "ModernBertForSequenceClassification", "modernbert", 514),
])
def test_one_label_cross_encoders_are_rerankers(tmp_path: Path, model_type: str, arch: str, expected: str,
                                                 length: int) -> None:
    info = rerank_info(model_dir(tmp_path / "m", model_type=model_type, architectures=[arch], pad_token_id=1,
                                 **ONE_LABEL))
    assert info is not None and info.architecture == expected and info.head == "classifier"
    assert (info.labels, info.pooling, info.max_length, info.dimensions) == (1, "cls", length, 32)
    assert info.prompt is None and info.source == "config"
    assert not info.encoder.is_embedding and info.encoder.max_length == length


def test_what_is_not_a_reranker(tmp_path: Path) -> None:
    nli = model_dir(tmp_path / "nli", model_type="bert", architectures=["BertForSequenceClassification"],
                    id2label={"0": "a", "1": "b", "2": "c"})
    assert rerank_info(nli) is None  # three labels: a classifier
    assert rerank_info(model_dir(tmp_path / "bare", model_type="bert", architectures=["BertForSequenceClassification"],
                                 num_labels=2)) is None  # transformers' default of 2 labels too
    assert rerank_info(model_dir(tmp_path / "emb", model_type="bert", architectures=["BertModel"])) is None
    chat = model_dir(tmp_path / "Qwen3-0.6B", model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    assert rerank_info(chat) is None
    assert rerank_info(model_dir(tmp_path / "nomic-reranker", model_type="nomic_bert")) is None
    assert rerank_info(tmp_path / "missing") is None
    ce = model_dir(tmp_path / "ce", model_type="bert", architectures=["BertForSequenceClassification"], **ONE_LABEL)
    assert rerank_info(ce, kind="embedding") is None and rerank_info(ce, kind="generation") is None


def test_decoder_rerankers_are_found_by_name_or_kind(tmp_path: Path) -> None:
    qwen = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 40960}
    named = rerank_info(model_dir(tmp_path / "Qwen3-Reranker-0.6B", **qwen))
    assert named is not None and named.head == "yes-no" and named.pooling == "last" and named.source == "name"
    assert named.prompt is QWEN3_RERANKER and named.max_length == 40960
    # A hub download: the snapshot dir is a hash, the repo's name is two levels up.
    snapshot = tmp_path / "hub" / "models--mlx-community--Qwen3-Reranker-4B-4bit" / "snapshots" / "abc123"
    assert rerank_info(model_dir(snapshot, **qwen)) is not None
    assert rerank_info(model_dir(tmp_path / "x", _name_or_path="Qwen/Qwen3-Reranker-8B", **qwen)) is not None
    forced = rerank_info(model_dir(tmp_path / "plain", **qwen), kind="rerank")
    assert forced is not None and forced.source == "override" and forced.head == "yes-no"
    two = model_dir(tmp_path / "two", model_type="bert", architectures=["BertForSequenceClassification"], num_labels=2)
    forced_ce = rerank_info(two, kind="rerank")  # the engine refuses its two labels when it loads it
    assert forced_ce is not None and forced_ce.labels == 2 and forced_ce.source == "override"


def _info() -> ModelInfo:
    return ModelInfo(format="safetensors", family="bert", parameter_count=1, quantization="F32",
                     context_length=512, template="", modified=dt.datetime.now(dt.timezone.utc))


@pytest.mark.parametrize("kind", [None, "rerank"])
def test_show_lists_rerank_as_the_only_capability(tmp_path: Path, kind: Optional[str]) -> None:
    path = model_dir(tmp_path / "ce", model_type="bert", architectures=["BertForSequenceClassification"], **ONE_LABEL)
    found = Located(kind="dir", path=path, size=1)
    marked = with_embedding(_info(), found, kind)
    assert marked is not None and marked.rerank and marked.capabilities == ["rerank"]
    gguf = with_embedding(_info(), Located(kind="gguf", path=tmp_path / "m.gguf", size=1), "rerank")
    assert gguf is not None and gguf.capabilities == ["rerank"]  # models.yaml says so, whatever the source
    plain = with_embedding(_info(), found, "generation")
    assert plain is not None and plain.capabilities == ["completion"]
