"""mlx_vlm's own generate as the reference for the server's vision answers: the family processor's inputs, greedy,
decoded the way the server streams text (mlx_lm's streaming detokenizer, stopping at EOS)."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from support.tinyvlm import sample_image

MAX_TOKENS = 10


class Reference:
    """mlx_vlm's generate on the same model: its processor's inputs (minus llava's `padding=True`, see
    test_llava_processor_padding_trap), greedy, decoded the way the server streams text."""

    def __init__(self, path: Path) -> None:
        from mlx_vlm.utils import load

        self.model, self.processor = load(str(path))
        self.family = self.model.config.model_type
        self.path = path
        self.memo: dict[tuple[int, str], tuple[str, int]] = {}

    def __call__(self, seed: int, text: str = "describe") -> tuple[str, int]:
        """The greedy answer for one image and `text`, and the prompt's token count."""
        if (seed, text) in self.memo:
            return self.memo[(seed, text)]
        from mlx_vlm import stream_generate

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = self.processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = sample_image(seed)
        inputs = dict(self.processor(text=[prompt], images=[[image]] if self.family == "idefics3" else [image]))
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        tokens = [
            r.token
            for r in stream_generate(
                self.model,
                self.processor,
                prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"],
                mask=inputs["attention_mask"],
                **extra,
            )
        ][:MAX_TOKENS]
        wrapper = load_tokenizer(self.path)
        eos = set(wrapper.eos_token_ids)
        detok = wrapper.detokenizer
        for t in tokens:
            if t in eos:
                break
            detok.add_token(t)
        detok.finalize()
        self.memo[(seed, text)] = (detok.text, int(inputs["input_ids"].shape[1]))
        return self.memo[(seed, text)]
