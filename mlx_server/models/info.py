"""What a model is, read from files on disk without MLX: for /api/tags, /api/show and /api/ps.

Model dirs give config.json and the tokenizer's chat template; GGUF files give their metadata (memory-mapped,
no tensor data read). Results are cached per (path, mtime) since listings are polled often. Whether a model
embeds or sees images also depends on models.yaml's `kind`, so `with_embedding` and `with_vision` mark it per
configured model (the catalog does, after the cached description).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from mlx_server.models.embedinfo import EmbeddingInfo, embedding_info
from mlx_server.models.ollama_store import OllamaError
from mlx_server.models.rerankinfo import RERANK_KINDS, rerank_info
from mlx_server.models.sources import Located


def kv_bytes_per_token(cfg: dict[str, Any]) -> int:
    """Float16 keys and values for one token across all layers, from an HF-style config."""
    text = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    layers = int(text.get("num_hidden_layers", 0) or 0)
    heads = int(text.get("num_attention_heads", 1) or 1)
    kv_heads = int(text.get("num_key_value_heads", heads) or heads)
    head_dim = int(text.get("head_dim") or (int(text.get("hidden_size", 0) or 0) // max(heads, 1)))
    return 2 * layers * kv_heads * head_dim * 2


def native_context_length(cfg: dict[str, Any]) -> int:
    text = cfg.get("text_config", cfg)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(text.get(key), int) and text[key] > 0:
            return int(text[key])
    return 4096


@dataclass(frozen=True)
class ModelInfo:
    format: str  # "safetensors" | "gguf"
    family: str
    parameter_count: int
    quantization: str
    context_length: int
    template: str
    modified: dt.datetime
    arch_info: dict[str, Any] = field(default_factory=dict)
    kv_bytes_per_token: int = 0
    embedding: Optional[EmbeddingInfo] = None  # set for an embedding-only model (see with_embedding)
    vision: bool = False  # takes images: a vision_config in config.json, or models.yaml `kind: vision`
    rerank: bool = False  # scores (query, document) pairs: a reranker's files, or models.yaml `kind: rerank`

    @property
    def parameter_size(self) -> str:
        n = self.parameter_count
        if n >= 1e9:
            return f"{n / 1e9:.1f}B"
        if n >= 1e6:
            return f"{n / 1e6:.0f}M"
        return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)

    @property
    def capabilities(self) -> list[str]:
        if self.rerank:
            return ["rerank"]  # it neither chats nor embeds
        if self.embedding is not None:
            return ["embedding"]  # as Ollama lists an embedding model; generation models embed too, unlisted
        caps = ["completion"]
        if "tools" in self.template:
            caps.append("tools")
        if self.vision:  # after tools, where Ollama lists a projector model's
            caps.append("vision")
        if "<think>" in self.template or "reasoning_content" in self.template:
            caps.append("thinking")
        return caps

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }


# Ollama's (llama.cpp's) `<arch>.pooling_type` numbers, for /api/show's model_info.
_POOLING_TYPES = {"mean": 1, "cls": 2, "last": 3}


def with_embedding(info: Optional[ModelInfo], found: Located, kind: Optional[str]) -> Optional[ModelInfo]:
    """`info` marked as an embedding-only model when its files say so, or models.yaml's `kind` (see embedinfo); or
    as a reranker, likewise (see rerankinfo).

    Only model dirs are looked at (GGUF embedding models are not served). Its model_info then states the length
    and width an input is embedded with. A pooling we cannot reproduce leaves `info` as it was: the engine refuses
    that model when it is used.
    """
    if info is not None and _reranks(found, kind):
        return replace(info, rerank=True)
    if info is None or found.path is None or not found.path.is_dir():
        return info
    try:
        emb = embedding_info(found.path, kind)
    except ValueError:
        return info
    if not emb.is_embedding:
        return info
    arch = {**info.arch_info, f"{info.family}.context_length": emb.max_length}
    if emb.dimensions:
        arch[f"{info.family}.embedding_length"] = emb.dimensions
    if emb.pooling in _POOLING_TYPES:
        arch[f"{info.family}.pooling_type"] = _POOLING_TYPES[emb.pooling]
    return replace(info, embedding=emb, arch_info=arch)


def _reranks(found: Located, kind: Optional[str]) -> bool:
    """models.yaml says `kind: rerank` (whatever the source, a GGUF too), or a model dir's files say reranker."""
    if kind in RERANK_KINDS:
        return True
    return found.path is not None and found.path.is_dir() and rerank_info(found.path, kind) is not None


def with_vision(info: Optional[ModelInfo], kind: Optional[str]) -> Optional[ModelInfo]:
    """`info` with models.yaml's `kind` applied: "vision" says the model takes images, any other kind that it
    does not (a vision checkpoint configured as `generation` is listed as a text model); None keeps what its files
    say.

    A GGUF never does: its vision tower (a projector) is not one of the weights we load.
    """
    if info is None or kind is None or info.format == "gguf":
        return info
    return replace(info, vision=kind == "vision")


def _mtime(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc)


def _dir_info(path: Path, size: int) -> ModelInfo:
    cfg = json.loads((path / "config.json").read_text())
    tok_cfg = path / "tokenizer_config.json"
    template: Any = ""
    if tok_cfg.is_file():
        try:
            template = json.loads(tok_cfg.read_text()).get("chat_template") or ""
        except ValueError:
            template = ""
    jinja = path / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text()
    weights = sorted(path.glob("*.safetensors"))
    return _config_info(cfg, template, size, _mtime(weights[0]) if weights else _mtime(path / "config.json"))


def _ollama_mlx_info(manifest_path: Path, size: int) -> ModelInfo:
    """An Ollama safetensors model, from its config and tokenizer_config layers (nothing assembled yet)."""
    from mlx_server.models.ollama_store import read_manifest_file
    from mlx_server.models.ollama_tensors import describe

    found = describe(read_manifest_file(manifest_path))
    return _config_info(
        found["config"], found["tokenizer_config"].get("chat_template") or "", size, _mtime(manifest_path)
    )


def _config_info(cfg: dict[str, Any], template: Any, size: int, modified: dt.datetime) -> ModelInfo:
    text = cfg.get("text_config", cfg)
    quant = cfg.get("quantization") or cfg.get("quantization_config") or {}
    bits = quant.get("bits")
    if bits:
        group = quant.get("group_size", 64) or 64
        bits_per_param = bits + 32 / group  # a float16 scale and bias per group
        quantization = f"Q{bits}"
    else:
        dtype = str(text.get("torch_dtype") or cfg.get("torch_dtype") or "float16")
        bits_per_param = 32 if "32" in dtype else 16
        quantization = {"float32": "F32", "bfloat16": "BF16"}.get(dtype, "F16")
    if isinstance(template, list):  # some tokenizers ship named templates
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    family = str(cfg.get("model_type", "unknown"))
    ctx = native_context_length(cfg)
    arch = {
        f"{family}.context_length": ctx,
        f"{family}.embedding_length": text.get("hidden_size"),
        f"{family}.block_count": text.get("num_hidden_layers"),
        f"{family}.attention.head_count": text.get("num_attention_heads"),
        f"{family}.attention.head_count_kv": text.get("num_key_value_heads"),
        f"{family}.vocab_size": text.get("vocab_size"),
    }
    return ModelInfo(
        format="safetensors",
        family=family,
        parameter_count=int(size * 8 / bits_per_param),
        quantization=quantization,
        context_length=ctx,
        template=str(template),
        modified=modified,
        arch_info={k: v for k, v in arch.items() if v is not None},
        kv_bytes_per_token=kv_bytes_per_token(cfg),
        # Multimodal checkpoints (LLaVA, Qwen2-VL, Gemma 3, …) nest the vision tower's config here.
        vision=isinstance(cfg.get("vision_config"), dict),
    )


def _gguf_info(path: Path) -> ModelInfo:
    from gguf import GGUFReader  # deferred: only GGUF sources need it

    from mlx_server.models.chat_templates import choose_template

    reader = GGUFReader(str(path), "r")

    def meta(key: str, default: Any = None) -> Any:
        fld = reader.fields.get(key)
        if fld is None:
            return default
        value = fld.contents()
        return value

    arch = str(meta("general.architecture", "llama"))
    ctx = int(meta(f"{arch}.context_length", 0) or 0)
    count = sum(int(t.n_elements) for t in reader.tensors)
    qtypes = {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")}
    info = {
        f"{arch}.{k}": meta(f"{arch}.{k}")
        for k in (
            "context_length",
            "embedding_length",
            "block_count",
            "attention.head_count",
            "attention.head_count_kv",
        )
    }
    heads = int(meta(f"{arch}.attention.head_count", 1) or 1)
    kv = kv_bytes_per_token(
        {
            "num_hidden_layers": meta(f"{arch}.block_count", 0),
            "num_attention_heads": heads,
            "num_key_value_heads": meta(f"{arch}.attention.head_count_kv", heads),
            "hidden_size": meta(f"{arch}.embedding_length", 0),
        }
    )
    return ModelInfo(
        format="gguf",
        family=arch,
        parameter_count=count,
        kv_bytes_per_token=kv,
        quantization=next(iter(qtypes), "unknown"),
        context_length=ctx,
        # The file's own template, else the built-in one the importer will use (it names itself).
        template=choose_template(arch, meta("tokenizer.chat_template"), meta("tokenizer.ggml.tokens", []))[1],
        modified=_mtime(path),
        arch_info={k: v for k, v in info.items() if v is not None},
    )


def _read(path: Path, size: int, kind: str) -> Optional[ModelInfo]:
    try:
        if kind == "ollama-mlx":
            return _ollama_mlx_info(path, size)
        return _gguf_info(path) if kind in ("gguf", "package", "ollama") else _dir_info(path, size)
    except (OSError, ValueError, KeyError, OllamaError):
        return None


def context_note(name: str, configured: Optional[int], native: int) -> Optional[str]:
    """The warning for a configured context_length past the model's own window (honoured, as Ollama's num_ctx is)."""
    if configured is None or not native or configured <= native:
        return None
    return (
        f"model {name}: context_length {configured} is above its native {native} (max_position_embeddings); "
        "it is honoured, but past the native window the model's quality is its own"
    )


class InfoCache:
    """describe() memoized per (path, mtime, size); one per app, since listings are polled often."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, float, int], Optional[ModelInfo]] = {}

    def describe(self, found: Located) -> Optional[ModelInfo]:
        if found.path is None:
            return None
        try:
            mtime = found.path.stat().st_mtime
        except OSError:
            return None
        key = (str(found.path), mtime, found.size)
        if key not in self._entries:
            if len(self._entries) > 256:
                self._entries.clear()
            self._entries[key] = _read(found.path, found.size, found.kind)
        return self._entries[key]
