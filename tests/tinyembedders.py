"""Tiny random-weight embedding checkpoints (BERT, XLM-RoBERTa) in the layouts real ones use.

Each folder has config.json, model.safetensors (Hugging Face tensor names) and a tokenizer.json trained here on
the shared tiny corpus; optionally the sentence-transformers files (modules.json, 1_Pooling/config.json). Like
all-MiniLM's, the tokenizer.json carries its own fixed padding and truncation, which the embedder must switch off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from tiny_templates import TRAINING_CORPUS

HIDDEN = 32
HEADS = 4
LAYERS = 2
INTERMEDIATE = 64
MAX_TOKENS = 24  # usable positions: short, so truncation is cheap to test


def _bert_tokenizer(out: Path) -> tuple[int, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TRAINING_CORPUS.splitlines(),
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials, show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.enable_truncation(8)  # shorter than the model's limit, as all-MiniLM's 128 is below its 256
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.save(str(out / "tokenizer.json"))
    return tok.get_vocab_size(), 0


def _xlmr_tokenizer(out: Path) -> tuple[int, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    # XLM-R's id order: <s>=0, <pad>=1, </s>=2, <unk>=3 — pad id 1 is what shifts its positions by 2.
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(TRAINING_CORPUS.splitlines(),
                            trainers.BpeTrainer(vocab_size=220, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # (sep, cls)
    tok.enable_padding(length=20, pad_id=1, pad_token="<pad>")
    tok.save(str(out / "tokenizer.json"))
    return tok.get_vocab_size(), 1


def build_tiny_encoder(out: Path, *, arch: str = "bert", seed: int = 0, pooling: Optional[str] = "mean",
                       prefix: str = "", hidden_act: str = "gelu") -> Path:
    """Write a tiny random `arch` ("bert" | "xlm-roberta") checkpoint to `out`; return `out`.

    pooling: None writes no sentence-transformers files; otherwise "mean" / "cls" / "last" / "max" in
    1_Pooling/config.json, with a Normalize module. prefix: tensor-name prefix ("bert." as a BertForMaskedLM
    checkpoint has it, plus an MLM head that must be ignored).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, pad_id = (_bert_tokenizer if arch == "bert" else _xlmr_tokenizer)(out)
    offset = pad_id + 1 if arch == "xlm-roberta" else 0
    cfg = {
        "architectures": ["BertModel" if arch == "bert" else "XLMRobertaModel"],
        "model_type": arch, "vocab_size": vocab, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE, "hidden_act": hidden_act,
        "max_position_embeddings": MAX_TOKENS + offset, "type_vocab_size": 2 if arch == "bert" else 1,
        "layer_norm_eps": 1e-12 if arch == "bert" else 1e-5, "pad_token_id": pad_id,
        "position_embedding_type": "absolute", "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    # Scales large enough that attention is far from uniform and layers change the vectors (std 0.02, BERT's
    # init, would make every sentence nearly the same vector and the comparison toothless).
    w: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": normal(vocab, HIDDEN, std=1.0),
        "embeddings.position_embeddings.weight": normal(MAX_TOKENS + offset, HIDDEN, std=0.5),
        "embeddings.token_type_embeddings.weight": normal(cfg["type_vocab_size"], HIDDEN, std=0.5),
        "embeddings.LayerNorm.weight": 1.0 + normal(HIDDEN, std=0.1),
        "embeddings.LayerNorm.bias": normal(HIDDEN, std=0.1),
        "embeddings.position_ids": np.arange(MAX_TOKENS + offset, dtype=np.int64)[None],  # a buffer, not a weight
        "pooler.dense.weight": normal(HIDDEN, HIDDEN, std=0.3), "pooler.dense.bias": normal(HIDDEN, std=0.1),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, (rows, cols) in {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
                                   "attention.self.value": (HIDDEN, HIDDEN),
                                   "attention.output.dense": (HIDDEN, HIDDEN),
                                   "intermediate.dense": (INTERMEDIATE, HIDDEN),
                                   "output.dense": (HIDDEN, INTERMEDIATE)}.items():
            w[p + name + ".weight"] = normal(rows, cols, std=1.2 / np.sqrt(cols))
            w[p + name + ".bias"] = normal(rows, std=0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + norm + ".weight"] = 1.0 + normal(HIDDEN, std=0.1)
            w[p + norm + ".bias"] = normal(HIDDEN, std=0.1)
    w = {prefix + k: v for k, v in w.items()}
    if prefix:  # a task head the embedder must drop
        w["cls.predictions.bias"] = normal(vocab, std=0.1)
        w["cls.predictions.transform.dense.weight"] = normal(HIDDEN, HIDDEN, std=0.1)
    save_file(w, str(out / "model.safetensors"))

    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens", "last": "pooling_mode_lasttoken"}
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": HIDDEN, **{flag: name == pooling for name, flag in flags.items()}}))
    return out
