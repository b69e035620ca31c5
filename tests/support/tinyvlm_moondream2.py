"""A tiny random-weight moondream2 checkpoint that mlx-vlm's real loader and Moondream processor accept offline.

Same conventions as ``tinyvlm.py`` (whose helpers it uses): a locally trained tokenizer (``<|endoftext|>`` is BOS
and EOS, as starmie-v1's), float32 weights named like the mlx-vlm ``Model``'s parameters, a text model of hidden
128 (two heads of 64) and 2 layers with moondream's partial rotary embedding and parallel attention + MLP blocks.
The vision tower keeps moondream's geometry, which its processor hard-codes (378 px crops of 14 px patches: 729
features an image), at hidden 32 and one layer; an image larger than a crop is cut into a global view plus
overlapping tiles, whose features are stitched and pooled back to the 27 x 27 grid.
"""

from __future__ import annotations

from pathlib import Path

from support.tinyvlm import _finish, _start

TEXT_HIDDEN = 128


def build_moondream2(path: Path, *, seed: int = 0) -> Path:
    out_dir, added, vocab_size = _start(path, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = added["<|endoftext|>"]
    config = {
        "model_type": "moondream2",
        "architectures": ["HfMoondream"],
        "bos_token_id": eos,
        "eos_token_id": eos,
        "text_config": {
            "model_type": "moondream2",
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            # Heads of 64: quantized KV groups 64 values of a head, so kv_cache q8 reaches the attention.
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "partial_rotary_factor": 0.5,
        },
        "vision_config": {
            "model_type": "moondream2_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 14,
            "crop_size": 378,
            "max_crops": 4,
            "overlap_margin": 4,
            "proj_inner_dim": 64,
            "proj_out_dim": TEXT_HIDDEN,
        },
    }
    return _finish(out_dir, config, seed=seed, head_name="text.lm_head.weight", special_ids=[eos])


__all__ = ["build_moondream2"]
