"""One loaded model: its BatchGenerator, per-sequence sampling and stop handling, and the events it publishes.

Only the inference thread calls into a runner. Every active sequence of the model shares one BatchGenerator, so
concurrent requests share decode steps; a sequence joins between steps and leaves without draining the batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from mlx_server.engine.constrained import Constraints
from mlx_server.engine.sampling import make_processors, make_sampler
from mlx_server.engine.output import SequenceOutput, make_output
from mlx_server.errors import BadRequest, InternalError, MlxServerError, RequestTimeout
from mlx_server.types import Delta, Done, Event, Failed, GenerateRequest, Started, Usage

log = logging.getLogger("mlx_server.engine")

Sink = Callable[[Event], None]
Clock = Callable[[], float]


@dataclass
class Sequence:
    request: GenerateRequest
    sink: Sink
    uid: int
    out: SequenceOutput
    prompt_tokens: int
    cached_tokens: int
    load_duration: float
    admitted_at: float
    first_token_at: Optional[float] = None
    generated: int = 0
    deadline: Optional[float] = None
    processors: list[Any] = field(default_factory=list)  # this sequence's logits processors, run under a guard


class ModelRunner:
    def __init__(self, name: str, model: Any, tokenizer: Any, context_length: int, *,
                 max_batch: int = 16, prompt_cache_bytes: int = 2**30, clock: Clock = time.perf_counter) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.clock = clock
        self.max_batch = max_batch
        self.generator = self._new_generator()
        # KV caches of recent prompts (and their answers) by token prefix; a follow-up turn reuses the shared part.
        self.prompt_cache = LRUPromptCache(max_size=1 << 30, max_bytes=prompt_cache_bytes)
        self.prompt_cache_bytes = prompt_cache_bytes
        self.constraints = Constraints(tokenizer)  # grammar processors; the vocabulary scan happens on first use
        self.sequences: dict[int, Sequence] = {}  # by BatchGenerator uid
        self.by_request: dict[int, int] = {}  # request_id → uid
        self.faults: dict[int, Exception] = {}  # request_id → what its own sampler / processors raised this step

    def _new_generator(self) -> BatchGenerator:
        eos = sorted(self.tokenizer.eos_token_ids)
        return BatchGenerator(self.model, stop_tokens=[[t] for t in eos], completion_batch_size=self.max_batch,
                              prefill_batch_size=min(8, self.max_batch))

    def reset(self) -> None:
        """After a failed step the batch state is unknown: start a fresh generator (sequences already failed)."""
        self.generator.close()
        self.generator = self._new_generator()

    # ---- prompt -------------------------------------------------------------------------------------------

    def render(self, req: GenerateRequest) -> list[int]:
        tok = self.tokenizer
        if req.prompt is not None and req.raw:
            return list(tok.encode(req.prompt))
        if req.suffix:
            raise BadRequest(f"model \"{self.name}\" does not support insert (suffix)")
        messages = [m.to_template() for m in (req.messages or [])]
        if req.prompt is not None:
            messages = [{"role": "user", "content": req.prompt}]
        if req.system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": req.system})
        if not getattr(tok, "has_chat_template", False):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return list(tok.encode(text))
        kwargs: dict[str, Any] = {}
        if req.tools:
            kwargs["tools"] = req.tools
        if req.think is not None:
            kwargs["enable_thinking"] = req.think
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        except Exception as exc:  # jinja errors name the template problem; the client sent the messages
            raise BadRequest(f"chat template failed for these messages: {exc}") from None
        return list(tok.encode(text, add_special_tokens=False))

    # ---- admission ----------------------------------------------------------------------------------------

    def add(self, req: GenerateRequest, sink: Sink, load_duration: float = 0.0) -> None:
        """Tokenize, fit the context, and join the batch. Raises MlxServerError for the caller to publish."""
        tokens = self.render(req)
        if req.count_only:  # /v1/messages/count_tokens: the tokenizer lives here, so counting does too
            sink(Started(req.request_id, self.name, len(tokens), 0, load_duration))
            sink(Done(req.request_id, self.name, "stop",
                      Usage(prompt_tokens=len(tokens), load_duration=load_duration)))
            return
        num_ctx = min(req.num_ctx or self.context_length, self.context_length)
        truncated = 0
        if len(tokens) >= num_ctx:
            # Like Ollama: keep the most recent tokens, leaving room to answer.
            room = min(req.max_tokens or num_ctx // 2, num_ctx // 2)
            keep = max(1, num_ctx - max(room, 1))
            truncated = len(tokens) - keep
            tokens = tokens[-keep:]
            log.warning("prompt for %s truncated: %d tokens dropped to fit num_ctx=%d",
                        self.name, truncated, num_ctx)
        if not tokens:
            raise BadRequest("prompt is empty after tokenization")
        max_tokens = num_ctx - len(tokens)
        if req.max_tokens is not None and req.max_tokens > 0:
            max_tokens = min(max_tokens, req.max_tokens)
        now = self.clock()
        cache, rest = self._cached_prefix(tokens)
        cached = len(tokens) - len(rest)
        chain = make_processors(req.sampling, num_ctx) + self.constraints.processors(req, max_tokens)
        [uid] = self.generator.insert(
            [rest], max_tokens=[max_tokens], caches=[cache], all_tokens=[tokens[:cached]],
            samplers=[self._guard_sampler(make_sampler(req.sampling), req.request_id)],
            logits_processors=[self._guard_processors(chain, req.request_id)])
        seq = Sequence(
            request=req, sink=sink, uid=uid, out=make_output(req, self.tokenizer, tokens),
            prompt_tokens=len(tokens), cached_tokens=cached, load_duration=load_duration, admitted_at=now,
            deadline=(req.created + req.timeout) if req.timeout else None, processors=chain)
        self.sequences[uid] = seq
        self.by_request[req.request_id] = uid
        sink(Started(req.request_id, self.name, len(tokens), cached, load_duration, truncated))

    def _guard_processors(self, chain: list[Any], request_id: int) -> list[Any]:
        """One request's processors, isolated: if they raise, that request fails and the batch goes on."""
        if not chain:
            return []  # no per-sequence work at all keeps BatchGenerator on its all-batched path

        def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
            if request_id in self.faults:
                return logits
            try:
                out = logits
                for processor in chain:
                    out = processor(tokens, out)
                return out
            except Exception as exc:  # noqa: BLE001 - contained to this request, reported by _fail_faulted
                self.faults[request_id] = exc
                return logits

        return [guarded]

    def _guard_sampler(self, sampler: Callable[[mx.array], mx.array], request_id: int
                       ) -> Callable[[mx.array], mx.array]:
        if sampler is greedy_sampler:
            return sampler  # mlx_lm's own argmax, shared so greedy sequences sample in one batched call

        def guarded(logprobs: mx.array) -> mx.array:
            try:
                return sampler(logprobs)
            except Exception as exc:  # noqa: BLE001 - contained to this request
                self.faults[request_id] = exc
                return greedy_sampler(logprobs)

        return guarded

    def _fail_faulted(self) -> None:
        for request_id, exc in list(self.faults.items()):
            log.error("request %d failed inside a decode step: %r", request_id, exc)
            self.fail(request_id, InternalError(f"generation failed for this request: {exc}"))
        self.faults.clear()

    def _cached_prefix(self, tokens: list[int]) -> tuple[Optional[list[Any]], list[int]]:
        """A private copy of the longest cached KV prefix, and the tokens still to evaluate (never none)."""
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.name, tokens)
        if cache is None:
            return None, tokens
        if not rest:
            # An exact hit still needs its last token run through the model to get the next logits.
            if not can_trim_prompt_cache(cache):
                return None, tokens
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return cache, rest

    def _keep_cache(self, tokens: Optional[list[int]], cache: Optional[list[Any]]) -> None:
        if tokens and cache:
            # Extracted caches are lazy slices of the whole batch's KV buffers; left unevaluated, each stored
            # entry would keep those buffers alive (measured: 12x its counted bytes). Materialize it now.
            mx.eval([c.state for c in cache])
            self.prompt_cache.insert_cache(self.name, list(tokens), cache)
            # The cap counts the KV the running batch holds too, so stored caches give way to live ones.
            self.prompt_cache.trim_to(n_bytes=max(0, self.prompt_cache_bytes - self.generator.prompt_cache_nbytes))

    def trim_prompt_cache(self, limit: int) -> None:
        """Hold the stored caches to `limit` bytes (least recently used go first)."""
        self.prompt_cache.trim_to(n_bytes=max(0, limit))

    def _remove(self, uids: list[int]) -> None:
        """Take sequences out of the batch, keeping their KV caches for later prompts that share a prefix."""
        for cache, tokens in self.generator.remove(uids, return_prompt_caches=True).values():
            self._keep_cache(tokens, cache)

    def has_work(self) -> bool:
        return bool(self.sequences)

    # ---- stepping -----------------------------------------------------------------------------------------

    def step(self) -> int:
        """One BatchGenerator step for every sequence of this model; returns tokens generated."""
        if not self.sequences:
            return 0
        self._expire_deadlines()
        if not self.sequences:
            return 0
        _, responses = self.generator.next()
        now = self.clock()
        if self.faults:
            self._fail_faulted()
        finished: list[int] = []
        for r in responses:
            seq = self.sequences.get(r.uid)
            if seq is None:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.generated += 1
            eos = r.finish_reason == "stop"  # BatchGenerator only stops on our eos stop tokens
            delta = seq.out.add(r.token, r.logprobs, eos=eos)
            if seq.out.stopped:
                finished.append(r.uid)
                self._emit(seq, delta)
                self._finish(seq, "stop", now)
            elif r.finish_reason is not None:
                self._keep_cache(r.all_tokens, r.prompt_cache)
                self._emit(seq, seq.out.finish(delta))
                self._finish(seq, "stop" if eos else "length", now)
            else:
                self._emit(seq, delta)
        if finished:
            self._remove(finished)
        return len(responses)

    def _emit(self, seq: Sequence, delta: Optional[Delta]) -> None:
        if delta is not None:
            seq.sink(delta)

    def _usage(self, seq: Sequence, now: float) -> Usage:
        first = seq.first_token_at or now
        return Usage(prompt_tokens=seq.prompt_tokens, cached_tokens=seq.cached_tokens,
                     completion_tokens=seq.generated, load_duration=seq.load_duration,
                     prompt_eval_duration=first - seq.admitted_at, eval_duration=now - first,
                     total_duration=seq.load_duration + (now - seq.admitted_at))

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        self.sequences.pop(seq.uid, None)
        self.by_request.pop(seq.request.request_id, None)
        if reason == "stop" and seq.out.made_tool_calls:
            reason = "tool_calls"
        seq.sink(Done(seq.request.request_id, self.name, reason, self._usage(seq, now),  # type: ignore[arg-type]
                      stop_sequence=seq.out.stop_sequence))

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        late = [s for s in self.sequences.values() if s.deadline is not None and now >= s.deadline]
        for seq in late:
            self.fail(seq.request.request_id,
                      RequestTimeout(f"request timed out after {seq.request.timeout:g}s"))

    # ---- leaving early ------------------------------------------------------------------------------------

    def cancel(self, request_id: int) -> bool:
        """Drop a sequence (client gone); takes effect before the next step."""
        uid = self.by_request.pop(request_id, None)
        if uid is None:
            return False
        seq = self.sequences.pop(uid)
        self._remove([uid])
        seq.sink(Done(request_id, self.name, "cancelled", self._usage(seq, self.clock())))
        return True

    def fail(self, request_id: int, error: MlxServerError) -> bool:
        uid = self.by_request.pop(request_id, None)
        if uid is None:
            return False
        seq = self.sequences.pop(uid)
        self.generator.remove([uid])
        seq.sink(Failed(request_id, error))
        return True

    def fail_all(self, error: MlxServerError) -> None:
        for request_id in list(self.by_request):
            self.fail(request_id, error)

    def close(self) -> None:
        self.fail_all(MlxServerError(f"model \"{self.name}\" was unloaded"))
        self.generator.close()
        # The pool drops its entry after this returns; clearing here lets gc free the weights right away.
        self.generator = None  # type: ignore[assignment]
        self.model = None
