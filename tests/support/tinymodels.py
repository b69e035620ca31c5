"""Tiny random-weight models that the real ``mlx_lm.load`` accepts.

Tests build these on the fly instead of downloading checkpoints: nothing may
come from the Hugging Face hub, and a real architecture plus a real
tokenizer exercises the same code paths as a production model.

Layout written by ``build_tiny_model`` (a normal MLX/HF checkpoint folder):
``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``.

On-disk size variation (``padding_bytes``): the extra bytes are stored in
``model.safetensors`` itself as a uint8 tensor named
``model.layers.0.self_attn.rotary_emb.inv_freq``.  Both the llama and qwen2
``sanitize`` methods drop every ``*.rotary_emb.inv_freq`` key (old HF
checkpoints carried such buffers), so strict loading still succeeds while
the weights file, and anything that sizes a model from its
``model*.safetensors`` files, grows by ``padding_bytes`` (plus ~100 bytes of
header).  The in-memory model is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from support.tiny_templates import CHATML_TEMPLATE, LLAMA3_TEMPLATE, TRAINING_CORPUS

# Byte-level BPE target before added tokens; 256 of these are the byte
# alphabet, the rest learned merges.
BPE_VOCAB_SIZE = 512

# Qwen2-style split: letters runs, single digits, punctuation runs,
# newlines and spaces apart.  Must equal transformers' Qwen2Tokenizer
# pattern, see build_tokenizer.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PAD_KEY = "model.layers.0.self_attn.rotary_emb.inv_freq"

# Special tokens hide from decoded text (skip_special_tokens); the
# tool-call and think markers must stay visible so parsers can see them.
CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIAL = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
TEXT_MARKERS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

# Init scales, tuned by checking greedy continuations (see
# tests/test_tinymodels.py): big enough that the residual stream is not just
# the current token's embedding (which collapses decoding into short loops),
# small enough that attention softmaxes don't saturate to one-hot.
EMBED_STD = 1.0
# A tied head scores each token by similarity with the residual stream, which
# is mostly the current token's own embedding unless the layers outweigh it;
# with std 1.0 qwen2 models just repeat their input token.  Small tied
# embeddings let the (scale-free, post-norm) layer outputs dominate.
TIED_EMBED_STD = 0.25
PROJ_GAIN = 2.5
BIAS_STD = 0.2
# Special-token rows of the output projection are shrunk so random greedy
# decoding rarely emits EOS/markers by accident: tests need long, varied
# continuations (no EOS in 900 sampled greedy steps).  Tests that need a
# natural stop pass eos_row_scale=2..5 (measured: at 2.0 most chat replies
# end within 40 tokens; at 5.0 almost all within 10).
SPECIAL_ROW_SCALE = 0.1


def build_tokenizer(
    out_dir: Path,
    *,
    chat_template: str = CHATML_TEMPLATE,
    extra_special: Sequence[str] = (),
    eos_token: str = "<|im_end|>",
    bos_token: str | None = None,
) -> None:
    """Train a small byte-level BPE and save it as an HF fast tokenizer.

    ``extra_special`` tokens are appended after the ChatML specials and the
    text markers, so ids of the common tokens never depend on it.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    # transformers 5 rebuilds qwen2 tokenizers with its own normalizer and
    # pre-tokenizer; using the same ones here makes tokenizer.json, the llama
    # path and the qwen2 path all encode identically.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        # The full byte alphabet is what makes arbitrary text (unicode,
        # emoji) encodable even though the corpus is ASCII-heavy.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_CORPUS.splitlines(keepends=True), trainer)

    specials = list(CHATML_SPECIAL) + [t for t in extra_special if t not in CHATML_SPECIAL]
    for name in (eos_token, bos_token):
        if name is not None and name not in specials and name not in TEXT_MARKERS:
            specials.append(name)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_MARKERS])
    extra = specials[len(CHATML_SPECIAL):]
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tok.save(str(out_dir / "tokenizer.json"))

    added_decoder: dict[str, dict[str, Any]] = {}
    for content in list(CHATML_SPECIAL) + list(TEXT_MARKERS) + extra:
        added_decoder[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": content not in TEXT_MARKERS,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _arch_config(
    arch: str,
    *,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    vocab_size: int,
    dtype: str,
) -> dict[str, Any]:
    """The HF-style config.json for ``arch`` (only keys ModelArgs reads, plus
    the usual metadata a real checkpoint carries)."""
    common = {
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    if arch == "llama":
        # Untied head, like Llama 3 8B, so both head layouts get covered.
        return {**common, "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
    if arch == "qwen2":
        # Tied head, like the small Qwen2.5 models.
        return {**common, "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0,
                "tie_word_embeddings": True}
    if arch == "qwen3":
        # Qwen3 (and Qwen3-Embedding): tied head, per-head RMSNorm on q and k, explicit head_dim, no qkv bias.
        return {**common, "architectures": ["Qwen3ForCausalLM"], "rope_theta": 1000000.0,
                "head_dim": hidden_size // num_heads, "tie_word_embeddings": True}
    raise ValueError(f"unsupported arch {arch!r}; expected 'llama', 'qwen2' or 'qwen3'")


def _init_weights(
    config: dict[str, Any],
    *,
    seed: int,
    special_ids: Sequence[int],
    eos_ids: Sequence[int],
    eos_row_scale: float,
    dtype: mx.Dtype,
) -> dict[str, mx.array]:
    """Random weights with the parameter names mlx_lm's llama/qwen2/qwen3 expect."""
    key = mx.random.key(seed)
    weights: dict[str, mx.array] = {}

    def normal(name: str, shape: tuple[int, ...], std: float) -> None:
        nonlocal key
        key, sub = mx.random.split(key)
        weights[name] = mx.random.normal(shape, key=sub) * std

    def linear(name: str, out_dim: int, in_dim: int) -> None:
        normal(f"{name}.weight", (out_dim, in_dim), PROJ_GAIN / in_dim**0.5)

    h = config["hidden_size"]
    inter = config["intermediate_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    head_dim = h // n_heads
    vocab = config["vocab_size"]
    qkv_bias = config["model_type"] == "qwen2"

    tied = config["tie_word_embeddings"]
    normal("model.embed_tokens.weight", (vocab, h), TIED_EMBED_STD if tied else EMBED_STD)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        linear(f"{p}.self_attn.q_proj", n_heads * head_dim, h)
        linear(f"{p}.self_attn.k_proj", n_kv * head_dim, h)
        linear(f"{p}.self_attn.v_proj", n_kv * head_dim, h)
        linear(f"{p}.self_attn.o_proj", h, n_heads * head_dim)
        if qkv_bias:
            normal(f"{p}.self_attn.q_proj.bias", (n_heads * head_dim,), BIAS_STD)
            normal(f"{p}.self_attn.k_proj.bias", (n_kv * head_dim,), BIAS_STD)
            normal(f"{p}.self_attn.v_proj.bias", (n_kv * head_dim,), BIAS_STD)
        if config["model_type"] == "qwen3":
            normal(f"{p}.self_attn.q_norm.weight", (head_dim,), 0.1)
            normal(f"{p}.self_attn.k_norm.weight", (head_dim,), 0.1)
            weights[f"{p}.self_attn.q_norm.weight"] += 1.0
            weights[f"{p}.self_attn.k_norm.weight"] += 1.0
        linear(f"{p}.mlp.gate_proj", inter, h)
        linear(f"{p}.mlp.up_proj", inter, h)
        linear(f"{p}.mlp.down_proj", h, inter)
        weights[f"{p}.input_layernorm.weight"] = mx.ones((h,))
        weights[f"{p}.post_attention_layernorm.weight"] = mx.ones((h,))
    weights["model.norm.weight"] = mx.ones((h,))

    head_name = "model.embed_tokens.weight"
    if not tied:
        head_name = "lm_head.weight"
        normal(head_name, (vocab, h), EMBED_STD)
    row_scale = mx.ones((vocab, 1))
    row_scale[mx.array(list(special_ids))] = SPECIAL_ROW_SCALE
    row_scale[mx.array(list(eos_ids))] = eos_row_scale
    weights[head_name] = weights[head_name] * row_scale

    return {k: v.astype(dtype) for k, v in weights.items()}


def build_tiny_model(
    out_dir: Path,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
    template: str = "chatml",
    padding_bytes: int = 0,
    eos_row_scale: float = SPECIAL_ROW_SCALE,
) -> Path:
    """Write a loadable tiny checkpoint to ``out_dir`` and return it.

    ``template`` is "chatml" (Qwen2.5-style, eos <|im_end|>) or "llama3"
    (header tokens, eos <|eot_id|> and <|endoftext|>, bos <|begin_of_text|>).
    ``padding_bytes`` enlarges model.safetensors without changing the model
    (see the module docstring).  ``eos_row_scale`` scales the EOS rows of the
    output head: the default keeps EOS away, larger values make greedy
    decoding stop on its own.  Same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if template == "chatml":
        build_tokenizer(out_dir, chat_template=CHATML_TEMPLATE)
        eos_names: list[str] = ["<|im_end|>"]
    elif template == "llama3":
        build_tokenizer(
            out_dir,
            chat_template=LLAMA3_TEMPLATE,
            extra_special=LLAMA3_SPECIAL,
            eos_token="<|eot_id|>",
            bos_token="<|begin_of_text|>",
        )
        # A list, like Llama 3 instruct configs, so multi-EOS handling is hit.
        eos_names = ["<|eot_id|>", "<|endoftext|>"]
    else:
        raise ValueError(f"unknown template {template!r}; expected 'chatml' or 'llama3'")

    tok_json = json.loads((out_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    # Model vocab equals tokenizer vocab exactly: a padded head could sample
    # ids the tokenizer cannot decode.
    vocab_size = 1 + max([*tok_json["model"]["vocab"].values(), *added.values()])
    eos_ids = [added[n] for n in eos_names]

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    config = _arch_config(
        arch,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        vocab_size=vocab_size,
        dtype=dtype,
    )
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    config["bos_token_id"] = added.get("<|begin_of_text|>")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    weights = _init_weights(
        config,
        seed=seed,
        special_ids=sorted(added.values()),
        eos_ids=eos_ids,
        eos_row_scale=eos_row_scale,
        dtype=getattr(mx, dtype),
    )
    if padding_bytes > 0:
        weights[PAD_KEY] = mx.zeros((padding_bytes,), dtype=mx.uint8)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out_dir


def reference_greedy(
    model_dir: Path, prompt_tokens: list[int], max_tokens: int, *, stop_at_eos: bool = True
) -> list[int]:
    """Greedy continuation computed by mlx_lm itself, the oracle for server
    output.  Like ``stream_generate``, an EOS token ends the run and is not
    included in the result."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(str(model_dir))
    out: list[int] = []
    # sampler=None is mlx_lm's argmax sampler, i.e. temperature 0.
    for token, _ in generate_step(mx.array(prompt_tokens), model, max_tokens=max_tokens):
        token = int(token)
        if stop_at_eos and token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return out


def perturbed_copy(src: Path, out_dir: Path, scale: float, seed: int = 3) -> Path:
    """A copy of the checkpoint at ``src`` (same tokenizer) whose weights carry Gaussian noise of ``scale`` times
    each tensor's spread: a draft model that agrees with its target often, not always."""
    import shutil

    import mlx.core as mx

    out_dir = Path(out_dir)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    weights = mx.load(str(Path(src) / "model.safetensors"))
    key = mx.random.key(seed)
    noisy = {}
    for name in sorted(weights):
        key, sub = mx.random.split(key)
        w = weights[name]
        noisy[name] = (w + scale * mx.std(w) * mx.random.normal(w.shape, key=sub)).astype(w.dtype)
    mx.save_safetensors(str(out_dir / "model.safetensors"), noisy)
    return out_dir
