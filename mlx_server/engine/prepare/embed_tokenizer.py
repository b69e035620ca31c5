"""Tokenizing for embedding models: the `tokenizers` library on tokenizer.json, truncating where we decide.

No MLX here, so the preparation stage's worker threads can tokenize. tokenizer.json files carry their own padding
and truncation (all-MiniLM's pads every input to 128 and cuts there, while sentence-transformers cuts at 256);
both are switched off: batches are padded by the embedder, with a mask, and inputs are truncated at the model's
`max_length` here, keeping the special tokens the model was trained with ([CLS] … [SEP], <s> … </s>).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer


class EmbedTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.special_tokens = tokenizer.num_special_tokens_to_add(is_pair=False)
        if max_length <= self.special_tokens:
            raise ValueError(f"max_length {max_length} leaves no room beside {self.special_tokens} special tokens")
        # How many of the specials go before the text ([CLS], <s>) and how many after ([SEP], </s>, or the
        # <|endoftext|> Qwen3-Embedding appends and pools on), seen by post-processing a probe.
        probe = tokenizer.encode("a", add_special_tokens=False)
        done = list(tokenizer.post_process(probe).ids)
        text = list(probe.ids)
        self.leading = next((i for i in range(len(done) - len(text) + 1) if done[i : i + len(text)] == text), 0)
        self.trailing = self.special_tokens - self.leading

    @classmethod
    def from_dir(cls, model_dir: Path, max_length: int) -> "EmbedTokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (embedding models need a fast tokenizer)")
        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: Sequence[str], *, truncate: bool = True) -> list[list[int]]:
        """Token ids with special tokens, one list per text. With truncate=False, an input longer than
        max_length comes back whole: the caller decides (Ollama's `truncate: false` is a 400)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        budget = self.max_length - self.special_tokens
        out: list[list[int]] = []
        for enc in encodings:
            if truncate and len(enc.ids) > budget:
                enc.truncate(budget)  # cut the text, then add the specials, so [SEP] / </s> stays last
            out.append(list(self.tokenizer.post_process(enc).ids))
        return out

    def cut(self, ids: Sequence[int], limit: int) -> list[int]:
        """An encoded input (specials included) cut to `limit` tokens by dropping text from its end: the leading
        and trailing special tokens stay, as `encode` keeps them."""
        ids = list(ids)
        if len(ids) <= limit:
            return ids
        tail = min(self.trailing, limit)  # a limit below the specials' count (num_ctx 1) keeps the closing ones
        return ids[: limit - tail] + ids[len(ids) - tail :]


__all__ = ["EmbedTokenizer"]
