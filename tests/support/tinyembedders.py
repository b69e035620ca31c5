"""Tiny random-weight embedding checkpoints (BERT, XLM-RoBERTa, nomic-bert, ModernBERT, Qwen3-Embedding) in the
layouts real ones use.

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

from support.tiny_templates import TRAINING_CORPUS

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
        write_pooling(out, pooling, HIDDEN)
    return out


def write_pooling(out: Path, pooling: str, width: int) -> None:
    """sentence-transformers files: Transformer → Pooling (`pooling`) → Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "max": "pooling_mode_max_tokens", "last": "pooling_mode_lasttoken"}
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": width, **{flag: name == pooling for name, flag in flags.items()}}))


def _normal(rng: np.random.Generator, *shape: int, std: float) -> np.ndarray:
    return rng.normal(0.0, std, size=shape).astype(np.float32)


def _proj(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return _normal(rng, rows, cols, std=1.2 / np.sqrt(cols))


NOMIC_INNER = 200  # the reference rounds a gated MLP's width up to a multiple of 256: 256 in the checkpoint


def build_tiny_nomic(out: Path, *, seed: int = 0, rotary_fraction: float = 1.0, interleaved: bool = False,
                     biases: bool = False, activation: str = "swiglu", prefix: str = "") -> Path:
    """A tiny random nomic-bert checkpoint in the hub's layout (GPT-2 style config keys, Nomic's tensor names).

    Defaults are nomic-embed-text-v1.5's choices (no projection biases, SwiGLU, full non-interleaved rotary,
    rope base 1000, n_positions above max_trained_positions); prefix "bert." with an MLM head is how a
    NomicBertForPreTraining checkpoint stores it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, _ = _bert_tokenizer(out)
    inner = (NOMIC_INNER + 255) // 256 * 256
    cfg = {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "activation_function": activation,
           "vocab_size": vocab, "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS, "n_inner": NOMIC_INNER,
           "n_positions": 64, "max_trained_positions": MAX_TOKENS, "rotary_emb_base": 1000,
           "rotary_emb_fraction": rotary_fraction, "rotary_emb_interleaved": interleaved,
           "rotary_emb_scale_base": None, "rotary_scaling_factor": None, "prenorm": False, "causal": False,
           "qkv_proj_bias": biases, "mlp_fc1_bias": biases, "mlp_fc2_bias": biases, "type_vocab_size": 2,
           "layer_norm_epsilon": 1e-12, "pad_token_id": 0, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": _normal(rng, vocab, HIDDEN, std=1.0),
        "embeddings.token_type_embeddings.weight": _normal(rng, 2, HIDDEN, std=0.5),
        "emb_ln.weight": 1.0 + _normal(rng, HIDDEN, std=0.1), "emb_ln.bias": _normal(rng, HIDDEN, std=0.1),
    }
    shapes = {"attn.Wqkv": (3 * HIDDEN, HIDDEN), "attn.out_proj": (HIDDEN, HIDDEN), "mlp.fc11": (inner, HIDDEN),
              "mlp.fc12": (inner, HIDDEN), "mlp.fc2": (HIDDEN, inner)}
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        for name, (rows, cols) in shapes.items():
            w[p + name + ".weight"] = _proj(rng, rows, cols)
            if biases:
                w[p + name + ".bias"] = _normal(rng, rows, std=0.1)
        for norm in ("norm1", "norm2"):
            w[p + norm + ".weight"] = 1.0 + _normal(rng, HIDDEN, std=0.1)
            w[p + norm + ".bias"] = _normal(rng, HIDDEN, std=0.1)
    w = {prefix + k: v for k, v in w.items()}
    if prefix:  # a task head the embedder must drop
        w["cls.predictions.transform.dense.weight"] = _normal(rng, HIDDEN, HIDDEN, std=0.1)
        w["cls.predictions.decoder.weight"] = _normal(rng, vocab, HIDDEN, std=0.1)
    save_file(w, str(out / "model.safetensors"))
    write_pooling(out, "mean", HIDDEN)
    return out


MODERNBERT_LAYERS = 4  # global attention in layers 0 and 3, local (sliding window) in 1 and 2
MODERNBERT_WINDOW = 6  # local_attention: each token sees 3 positions either side


def build_tiny_modernbert(out: Path, *, seed: int = 0, new_config: bool = False, prefix: str = "",
                          pooling: str = "mean") -> Path:
    """A tiny random ModernBERT checkpoint. new_config=True writes the transformers-5 form of the config
    (layer_types, rope_parameters) instead of the original keys; prefix "model." with an MLM head is how a
    ModernBertForMaskedLM checkpoint stores it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, _ = _bert_tokenizer(out)
    inter = 48
    cfg: dict[str, object] = {
        "architectures": ["ModernBertModel"], "model_type": "modernbert", "vocab_size": vocab,
        "hidden_size": HIDDEN, "num_hidden_layers": MODERNBERT_LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": inter, "hidden_activation": "gelu", "max_position_embeddings": MAX_TOKENS,
        "norm_eps": 1e-5, "norm_bias": False, "attention_bias": False, "mlp_bias": False,
        "local_attention": MODERNBERT_WINDOW, "pad_token_id": 0, "torch_dtype": "float32"}
    if new_config:
        cfg["layer_types"] = ["full_attention" if i % 3 == 0 else "sliding_attention"
                              for i in range(MODERNBERT_LAYERS)]
        cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    else:
        cfg.update(global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {"embeddings.tok_embeddings.weight": _normal(rng, vocab, HIDDEN, std=1.0),
                                "embeddings.norm.weight": 1.0 + _normal(rng, HIDDEN, std=0.1),
                                "final_norm.weight": 1.0 + _normal(rng, HIDDEN, std=0.1)}
    for i in range(MODERNBERT_LAYERS):
        p = f"layers.{i}."
        if i > 0:
            w[p + "attn_norm.weight"] = 1.0 + _normal(rng, HIDDEN, std=0.1)
        w[p + "mlp_norm.weight"] = 1.0 + _normal(rng, HIDDEN, std=0.1)
        w[p + "attn.Wqkv.weight"] = _proj(rng, 3 * HIDDEN, HIDDEN)
        w[p + "attn.Wo.weight"] = _proj(rng, HIDDEN, HIDDEN)
        w[p + "mlp.Wi.weight"] = _proj(rng, 2 * inter, HIDDEN)
        w[p + "mlp.Wo.weight"] = _proj(rng, HIDDEN, inter)
    w = {prefix + k: v for k, v in w.items()}
    if prefix:
        w["head.dense.weight"] = _normal(rng, HIDDEN, HIDDEN, std=0.1)
        w["head.norm.weight"] = np.ones(HIDDEN, np.float32)
        w["decoder.bias"] = _normal(rng, vocab, std=0.1)
    save_file(w, str(out / "model.safetensors"))
    write_pooling(out, pooling, HIDDEN)
    return out


def build_tiny_qwen3_embedder(out: Path, *, seed: int = 0, bare: bool = True, tied: bool = True) -> Path:
    """A tiny random Qwen3-Embedding-style checkpoint: mlx_lm's qwen3 with last-token pooling and Normalize in the
    sentence-transformers files, and a tokenizer that appends <|endoftext|> to every input (as Qwen3-Embedding's).

    bare=True stores the base model as sentence-transformers does (`Qwen3Model`: tensor names without `model.`);
    tied=False says `tie_word_embeddings: false` with no lm_head tensor at all (Qwen3-Embedding-8B's layout).
    The same seed gives the same weights in every layout.
    """
    from support.tinymodels import build_tiny_model  # mlx-based; only this builder needs it

    out = build_tiny_model(Path(out), arch="qwen3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=MAX_TOKENS, seed=seed)
    tok = json.loads((out / "tokenizer.json").read_text())
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    tok["post_processor"] = {"type": "Sequence", "processors": [
        tok["post_processor"],
        {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                  {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                  {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eos], "tokens": ["<|endoftext|>"]}}}]}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = tied
    if bare:
        cfg["architectures"] = ["Qwen3Model"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    from safetensors.numpy import load_file

    weights = load_file(str(out / "model.safetensors"))
    if bare:
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    save_file(weights, str(out / "model.safetensors"))
    write_pooling(out, "last", 64)
    return out
