"""mlx_vlm's own generate as the reference for the server's vision answers: the family processor's inputs, greedy,
decoded the way the server streams text (mlx_lm's streaming detokenizer, stopping at EOS); and the helpers the
vision engine tests share (image data, requests, answers, engines)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Mapping

from mlx_lm.tokenizer_utils import load as load_tokenizer
from PIL import Image

from mlx_server.contract.events import Delta, Done, Started
from mlx_server.contract.requests import ChatMessage, GenerateRequest, SamplingParams
from mlx_server.engine.engine import Engine
from support.enginetools import Waiter
from support.serving import make_config
from support.tinyvlm import sample_image

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0)

Inputs = tuple[str, dict[str, Any], dict[str, Any]]  # prompt, processor inputs, extra generate inputs


def b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def image_request(model: str, text: str, images: list[str]) -> GenerateRequest:
    """One greedy user message of `text` and these (base64) images."""
    return GenerateRequest(
        model=model,
        messages=[ChatMessage(role="user", content=text, images=images)],
        sampling=GREEDY,
        max_tokens=MAX_TOKENS,
    )


def submit(engine: Engine, req: GenerateRequest) -> Waiter:
    waiter = Waiter(req)
    engine.submit(req, waiter)
    return waiter


def text_request(engine: Engine, model: str) -> Waiter:
    """A text-only request to a vision model, submitted."""
    return submit(engine, GenerateRequest(model=model, prompt="plain words", sampling=GREEDY, max_tokens=MAX_TOKENS))


def answer(w: Waiter, timeout: float = 120) -> str:
    end = w.wait(timeout)
    assert isinstance(end, Done), end
    return "".join(e.content for e in w.seen if isinstance(e, Delta))


def started(w: Waiter) -> Started:
    return next(e for e in w.seen if isinstance(e, Started))


def vision_worker(engine: Engine, model: str) -> Any:
    entry = engine.core.pool.get(model)
    assert entry is not None
    return entry.model.workers["vision"]


def start_engine(tmp: Path, models: Mapping[str, Path], **server: Any) -> Engine:
    """A started engine serving these model folders (`server`: make_config's settings)."""
    engine = Engine(make_config(tmp, {name: {"source": str(path)} for name, path in models.items()}, **server))
    engine.start()
    return engine


class Reference:
    """mlx_vlm's generate on the same model: its processor's inputs (minus llava's `padding=True`, see
    test_llava_processor_padding_trap), greedy, decoded the way the server streams text."""

    def __init__(self, path: Path) -> None:
        from mlx_vlm.utils import load

        self.model, self.processor = load(str(path))
        self.family = self.model.config.model_type
        self.path = path
        self.memo: dict[tuple[int, str], tuple[str, int]] = {}

    def chat_inputs(self, content: list[dict[str, Any]], images: list[Any]) -> tuple[str, dict[str, Any]]:
        """The prompt the chat template makes of one user message of `content` parts, and the processor's inputs
        for it and `images`."""
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt, dict(self.processor(text=[prompt], images=images))

    def parts_inputs(self, parts: list[Any], image: Callable[[Any], Image.Image]) -> tuple[str, dict[str, Any]]:
        """`chat_inputs` for text (str) and images (anything else, made by `image`) in message order."""
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
        return self.chat_inputs(content, [image(p) for p in parts if not isinstance(p, str)])

    def generate(self, key: tuple[int, str], build: Callable[[], Inputs]) -> tuple[str, int]:
        """The greedy answer for the inputs `build` makes (memoized under `key`), and the prompt's token count."""
        if key in self.memo:
            return self.memo[key]
        from mlx_vlm import stream_generate

        prompt, inputs, extra = build()
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
        self.memo[key] = (detok.text, int(inputs["input_ids"].shape[1]))
        return self.memo[key]

    def __call__(self, seed: int, text: str = "describe") -> tuple[str, int]:
        """The greedy answer for one image and `text`, and the prompt's token count."""

        def build() -> Inputs:
            image = sample_image(seed)
            content = [{"type": "image"}, {"type": "text", "text": text}]
            prompt, inputs = self.chat_inputs(content, [[image]] if self.family == "idefics3" else [image])
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
            return prompt, inputs, extra

        return self.generate((seed, text), build)
