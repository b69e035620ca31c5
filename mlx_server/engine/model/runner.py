"""Generation on one loaded model (its `generate` worker): the BatchGenerator, per-sequence sampling and stop
handling, the prompt cache, and the events it publishes.

Only the inference thread calls into a worker. Every decoding sequence of the model shares one BatchGenerator, so
concurrent requests share decode steps; a sequence joins between steps and leaves without draining the batch.
A new prompt is first prefilled in chunks into a cache of its own (engine/loop/prefill.py schedules the chunks
between decode steps) and joins the batch when only its last token is left.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from mlx_server.contract.errors import InternalError, MlxServerError, RequestTimeout
from mlx_server.contract.events import Delta, Done, DoneReason, Failed, Sink, Started
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.loop.budget import kv_bound
from mlx_server.engine.loop.prefill import EncodeGate, PrefillJob
from mlx_server.engine.model.kvquant import make_cache
from mlx_server.engine.model.output import make_output
from mlx_server.engine.model.promptcache import SessionPromptCache
from mlx_server.engine.model.sampling import (
    first_token,
    guard_processors,
    guard_sampler,
    make_processors,
    make_sampler,
)
from mlx_server.engine.model.sequence import Sequence, keep_head, shift_limit, shift_tokens, shifts, usage
from mlx_server.engine.model.speculative import Drafting, install
from mlx_server.engine.model.vision import ShiftedKVCache, VisionInputs
from mlx_server.engine.prepare.stage import Prepared

log = logging.getLogger("mlx_server.engine")

Clock = Callable[[], float]
# A request's draft_num_predict beyond this is clamped: the verify pass grows with it (models.yaml's num_draft caps
# at the same value).
MAX_DRAFT = 32


class GenerateWorker:
    """Implements engine.loop.jobs.Worker for `Prepared` generations."""

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        context_length: int,
        *,
        kv_per_token: int = 0,
        max_batch: int = 16,
        prompt_cache_bytes: int = 2**30,
        clock: Clock = time.monotonic,
        kv: str = "f16",
        draft: Optional[Drafting] = None,
    ) -> None:
        self.name = name
        self.draft = draft
        self.kv = kv  # every cache of this model is stored so: one batch cannot mix quantized and float rows
        self.kv_per_token = kv_per_token
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.clock = clock
        self.max_batch = max_batch
        self.generator = self._new_generator()
        # KV caches of recent prompts (and their answers) by token prefix; a follow-up turn reuses the shared part.
        self.prompt_cache = SessionPromptCache(prompt_cache_bytes)
        self.prompt_cache_bytes = prompt_cache_bytes
        self.sequences: dict[int, Sequence] = {}  # decoding, by BatchGenerator uid
        self.prefilling: dict[int, Sequence] = {}  # by request_id: prompts not yet in the batch
        self.fresh = 0  # decode steps still owed to sequences that just joined: their first token comes before prefill
        self.by_request: dict[int, int] = {}  # request_id → uid
        self.faults: dict[int, Exception] = {}  # request_id → what its own sampler / processors raised this step
        self.keys: dict[int, list[int]] = {}  # uid → its prompt's cache key, for sequences whose key is not its tokens
        self.sessions: dict[int, str] = {}  # uid → the session (prompt_cache_key) its stored cache belongs to
        self.gate = EncodeGate()

    def _new_generator(self) -> BatchGenerator:
        eos = sorted(self.tokenizer.eos_token_ids)
        generator = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in eos],
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(8, self.max_batch),
        )
        if self.draft is not None:
            install(generator, self.draft.speculation(self.model, self._num_draft, self._record_draft))
        return generator

    def _num_draft(self, uid: int) -> int:
        seq = self.sequences.get(uid)
        return seq.num_draft if seq is not None else 0

    def _record_draft(self, uid: int, drafted: int, accepted: int) -> None:
        seq = self.sequences.get(uid)
        if seq is not None:
            seq.drafted += drafted
            seq.accepted += accepted

    def reset(self) -> None:
        """After a failed step the batch state is unknown: start a fresh generator (sequences already failed)."""
        old, self.generator = self.generator, self._new_generator()
        try:
            old.close()
        except Exception:  # noqa: BLE001 - the broken batch is dropped either way
            log.exception("closing a failed batch of %s", self.name)

    # ---- memory (the rules are engine/loop/budget.py's) --------------------------------------------------

    def kv_bytes(self, lengths: list[int]) -> int:
        return kv_bound(lengths, self.kv_per_token)

    def _reservations(self) -> list[int]:
        return [s.kv_tokens for s in (*self.sequences.values(), *self.prefilling.values())]

    @property
    def reserved(self) -> int:
        return self.kv_bytes(self._reservations())

    def needed(self, prepared: Prepared) -> int:
        return self.kv_bytes([*self._reservations(), prepared.kv_tokens]) - self.kv_bytes(self._reservations())

    def footprint(self, prepared: Prepared) -> int:
        return self.kv_bytes([prepared.kv_tokens])

    @property
    def stored(self) -> int:
        return self.prompt_cache.nbytes

    # ---- admission ----------------------------------------------------------------------------------------

    def add(
        self, prepared: Prepared, sink: Sink, load_duration: float = 0.0, vision: Optional[VisionInputs] = None
    ) -> None:
        """Admit a request (its prompt already tokenized and fitted): its prefill starts from the longest cached
        prefix, and it joins the batch once prefilled. Raises MlxServerError for the caller. A prompt with images
        brings `vision`: its images' features fill their positions as it is prefilled."""
        req, tokens = prepared.request, prepared.tokens
        now = self.clock()
        key = vision.key(tokens) if vision is not None else None
        cache, cached = self._cached_prefix(tokens, key)
        job = PrefillJob(req.request_id, self.name, int(req.priority), list(tokens), cache, cached, now, cached=cached)
        if vision is not None:
            job = vision.job(job)
        chain = make_processors(req.sampling, prepared.num_ctx) + list(prepared.grammar)
        seq = Sequence(
            request=req,
            sink=sink,
            uid=None,
            out=make_output(req, self.tokenizer, tokens),
            prompt_tokens=len(tokens),
            cached_tokens=cached,
            load_duration=load_duration,
            admitted_at=now,
            deadline=(req.created + req.timeout) if req.timeout else None,
            processors=chain,
            kv_tokens=prepared.kv_tokens,
            max_tokens=prepared.max_tokens,
            job=job,
            key=key,
            rope_shift=vision.rope_delta if vision is not None else 0,
            num_draft=self._drafts_for(req),
            num_ctx=prepared.num_ctx,
            keep=prepared.keep,
            grammar=bool(prepared.grammar),
            history=list(tokens) if req.shift else [],
        )
        self.prefilling[req.request_id] = seq
        if cached == len(tokens) - 1:
            try:
                self._join(
                    seq, Started(req.request_id, self.name, len(tokens), cached, load_duration, prepared.truncated)
                )  # nothing left to prefill
            except BaseException:
                self.prefilling.pop(req.request_id, None)
                raise
            return
        sink(Started(req.request_id, self.name, len(tokens), cached, load_duration, prepared.truncated))

    # ---- prefill (scheduled by engine/loop/prefill.py) ------------------------------------------------------

    def prefill_jobs(self) -> list[PrefillJob]:
        return [s.job for s in self.prefilling.values() if s.job is not None and s.job.ready(self.gate)]

    def prefill(self, job: PrefillJob, n: int) -> int:
        """Prefill the next `n` tokens of `job`'s prompt (when only its last token is left, it joins the batch);
        returns the tokens run."""
        n = job.advance(self.model, n, self.gate)
        if job.remaining == 0:
            self._join(self.prefilling[job.request_id])
        return n

    def fail_prefill(self, job: PrefillJob, exc: Exception) -> None:
        self.fail(job.request_id, InternalError(f"prompt processing failed for this request: {exc}"))

    def _join(self, seq: Sequence, started: Optional[Started] = None) -> None:
        """The prompt is prefilled but for its last token: that token's pass gives the first token. Where it can,
        the worker runs that pass itself and sends the token at once; the batch would return it only on its second
        step after the sequence joins (it pipelines each step's sampling behind the next), ~2 decode steps later.
        `started` goes out first when the Started event is still owed."""
        job, req = seq.job, seq.request
        assert job is not None
        tokens = job.tokens
        cache = job.cache
        sampler = guard_sampler(make_sampler(req.sampling), req.request_id, self.faults)
        processors = guard_processors(seq.processors, req.request_id, self.faults)
        if started is not None:
            seq.sink(started)
        prompt, context, max_tokens = tokens[-1:], tokens[:-1], seq.max_tokens
        if self.draft is None and seq.key is None and not seq.rope_shift:
            token, logprobs = first_token(self.model, tokens, cache, sampler, processors)
            if self._took_first(seq, token, logprobs, cache, tokens):
                return  # it ended, failed or shifted on that token
            prompt, context, max_tokens = [token], tokens, seq.max_tokens - 1
        if seq.rope_shift:
            cache = [ShiftedKVCache.of(c, seq.rope_shift) for c in cache]
        [uid] = self.generator.insert(
            [prompt],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[context],
            samplers=[sampler],
            logits_processors=[processors],
        )
        del self.prefilling[req.request_id]
        seq.uid, seq.job = uid, None
        self.fresh = 2  # BatchGenerator returns a new sequence's first token on the second step after it joins
        self.sequences[uid] = seq
        self.by_request[req.request_id] = uid
        if seq.key is not None:
            self.keys[uid] = seq.key
        if req.cache_key is not None:
            self.sessions[uid] = req.cache_key

    def _took_first(self, seq: Sequence, token: int, logprobs: mx.array, cache: list[Any], tokens: list[int]) -> bool:
        """Hand out a sequence's first token (taken before it joins the batch); True when the sequence is done with
        it: ended (a stop, EOS, or max tokens 1), failed in its sampler, or shifted out of a full window."""
        req, now = seq.request, self.clock()
        if req.request_id in self.faults:
            self._fail_faulted()
            return True
        eos = token in self.tokenizer.eos_token_ids
        delta = seq.take(token, logprobs, eos, now)
        if not (eos or seq.out.stopped or seq.max_tokens <= 1):  # the window's or the request's last token
            self._emit(seq, delta)
            return False
        if not (eos or seq.out.stopped) and shifts(seq):
            self._emit(seq, delta)
            self._shift(seq, cache, now)  # it stays among the prefilling, with its kept tail to prefill again
            return True
        del self.prefilling[req.request_id]
        self._emit(seq, delta if seq.out.stopped else seq.out.finish(delta))
        self._keep_cache(tokens, cache, seq.key, req.cache_key)
        self._finish(seq, "stop" if eos or seq.out.stopped else "length", now)
        return True

    def _fail_faulted(self) -> None:
        for request_id, exc in list(self.faults.items()):
            log.error("request %d failed inside a decode step: %r", request_id, exc)
            self.fail(request_id, InternalError(f"generation failed for this request: {exc}"))
        self.faults.clear()

    def _drafts_for(self, req: GenerateRequest) -> int:
        if self.draft is None:
            return 0
        wanted = req.num_draft if req.num_draft is not None else self.draft.num_draft
        return max(0, min(wanted, MAX_DRAFT))

    def _cached_prefix(self, tokens: list[int], key: Optional[list[int]] = None) -> tuple[list[Any], int]:
        """A private copy of the longest cached KV prefix (or a fresh cache), and how many tokens it holds."""
        cache, cached = self.prompt_cache.nearest(self.name, tokens, key)
        return (cache, cached) if cache is not None else (make_cache(self.model, self.kv), 0)

    def _keep_cache(
        self,
        tokens: Optional[list[int]],
        cache: Optional[list[Any]],
        key: Optional[list[int]] = None,
        session: Optional[str] = None,
    ) -> None:
        if tokens and cache and self.prompt_cache_bytes > 0:
            # The cap counts the KV the running batch holds too, so stored caches give way to live ones.
            live = self.generator.prompt_cache_nbytes
            self.prompt_cache.keep(self.name, list(tokens), cache, key, session, self.prompt_cache_bytes - live)

    def _keep_cache_of(self, uid: int, tokens: Optional[list[int]], cache: Optional[list[Any]]) -> None:
        self._keep_cache(tokens, cache, self.keys.pop(uid, None), self.sessions.pop(uid, None))

    def trim(self, limit: int) -> None:
        """Hold the stored caches to `limit` bytes (least recently used go first)."""
        self.prompt_cache.trim_to(n_bytes=max(0, limit))

    def _remove(self, uids: list[int]) -> None:
        """Take sequences out of the batch, keeping their KV caches for later prompts that share a prefix."""
        for uid, (cache, tokens) in self.generator.remove(uids, return_prompt_caches=True).items():
            self._keep_cache_of(uid, tokens, cache)

    @property
    def joining(self) -> bool:
        """A sequence that just joined is still owed its first token (which comes before more prefill). Derived
        from the sequences themselves, so one that left early (a client that hung up) owes nothing."""
        return self.fresh > 0 and any(s.first_token_at is None for s in self.sequences.values())

    def has_work(self) -> bool:
        return bool(self.sequences or self.prefilling)

    # ---- stepping -----------------------------------------------------------------------------------------

    def step(self, now: Optional[float] = None) -> int:
        """One BatchGenerator step for every decoding sequence of this model; returns tokens generated. `now`
        (time.monotonic's, the default) decides timeouts: distributed, it is the step plan's, the same on all ranks."""
        self._expire_deadlines(time.monotonic() if now is None else now)
        self.fresh = max(0, self.fresh - 1) if self.sequences else 0
        self.gate.open = True  # one image encode per prefill slice: the next may run after this step
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
            eos = r.finish_reason == "stop"  # BatchGenerator only stops on our eos stop tokens
            delta = seq.take(r.token, r.logprobs, eos, now)
            if seq.out.stopped:
                finished.append(r.uid)
                self._emit(seq, delta)
                self._finish(seq, "stop", now)
            elif r.finish_reason == "length" and shifts(seq):
                self._emit(seq, delta)
                self._shift(seq, r.prompt_cache, now)
            elif r.finish_reason is not None:
                # The client's last token first: storing the cache evaluates a copy of its KV (~8 ms for 1,500
                # tokens of a tiny model). Done after it, since Done may unload the model (keep_alive 0).
                self._emit(seq, seq.out.finish(delta))
                self._keep_cache_of(r.uid, r.all_tokens, r.prompt_cache)
                self._finish(seq, "stop" if eos else "length", now)
            else:
                self._emit(seq, delta)
        if finished:
            self._remove(finished)
        return len(responses)

    # ---- context shift (Ollama's `shift`; the policy is engine/model/sequence.py's) --------------------------

    def _shift(self, seq: Sequence, cache: Optional[list[Any]], now: float) -> None:
        """Drop the older half of what follows the kept head and prefill the rest again: MLX's caches hold keys
        already rotated for their positions, so unlike llama.cpp's K-shift the kept tail is recomputed (the head's
        KV is kept). The sequence leaves the batch and rejoins it when that prefill is done."""
        req = seq.request
        tokens, discard = shift_tokens(seq)
        if cache and keep_head(cache, seq.keep):
            cached = seq.keep
        else:
            cache, cached = self._cached_prefix(tokens)
        if seq.uid is not None:
            self.sequences.pop(seq.uid, None)
            self.keys.pop(seq.uid, None)
            self.sessions.pop(seq.uid, None)
        self.by_request.pop(req.request_id, None)
        seq.uid = None
        seq.max_tokens = min(seq.num_ctx - len(tokens), shift_limit(seq) - seq.generated)
        seq.job = PrefillJob(req.request_id, self.name, int(req.priority), tokens, cache, cached, now, cached=cached)
        log.info(
            "request %d reached num_ctx=%d: context shift %d dropped %d tokens after the first %d",
            req.request_id,
            seq.num_ctx,
            seq.shifts,
            discard,
            seq.keep,
        )
        self.prefilling[req.request_id] = seq
        if cached == len(tokens) - 1:
            self._join(seq)

    def _emit(self, seq: Sequence, delta: Optional[Delta]) -> None:
        if delta is not None:
            seq.sink(delta)

    def _finish(self, seq: Sequence, reason: DoneReason, now: float) -> None:
        if seq.uid is not None:
            self.sequences.pop(seq.uid, None)
        self.by_request.pop(seq.request.request_id, None)
        if reason == "stop" and seq.out.made_tool_calls:
            reason = "tool_calls"
        seq.sink(
            Done(
                seq.request.request_id,
                self.name,
                reason,
                usage(seq, now),
                stop_sequence=seq.out.stop_sequence,
                window=reason == "length" and seq.generated < (seq.request.max_tokens or seq.generated + 1),
            )
        )

    def _expire_deadlines(self, now: float) -> None:
        late = [
            s
            for s in (*self.sequences.values(), *self.prefilling.values())
            if s.deadline is not None and now >= s.deadline
        ]
        for seq in late:
            self.fail(seq.request.request_id, RequestTimeout(f"request timed out after {seq.request.timeout:g}s"))

    # ---- leaving early ------------------------------------------------------------------------------------

    def cancel(self, request_id: int) -> bool:
        """Drop a sequence (client gone); takes effect before the next step or prefill chunk."""
        seq = self.prefilling.pop(request_id, None)
        if seq is not None:
            if seq.job is not None and seq.job.done > 0:
                # a retry resumes from here
                self._keep_cache(seq.job.tokens[: seq.job.done], seq.job.cache, seq.key, seq.request.cache_key)
            seq.sink(Done(request_id, self.name, "cancelled", usage(seq, self.clock())))
            return True
        uid = self.by_request.pop(request_id, None)
        if uid is None:
            return False
        seq = self.sequences.pop(uid)
        seq.sink(Done(request_id, self.name, "cancelled", usage(seq, self.clock())))
        self._remove([uid])
        return True

    def fail(self, request_id: int, error: MlxServerError) -> bool:
        """End one sequence with an error. Its Failed goes out before the batch cleanup, which may raise."""
        seq = self.prefilling.pop(request_id, None)
        if seq is not None:
            seq.sink(Failed(request_id, error))
            return True
        uid = self.by_request.pop(request_id, None)
        if uid is None:
            return False
        seq = self.sequences.pop(uid)
        self.keys.pop(uid, None)
        self.sessions.pop(uid, None)
        seq.sink(Failed(request_id, error))
        self.generator.remove([uid])
        return True

    def fail_all(self, error: MlxServerError) -> None:
        """End every sequence: all are told first; then the batch is replaced, since its state is unknown."""
        failed = [*self.sequences.values(), *self.prefilling.values()]
        self.sequences.clear()
        self.prefilling.clear()
        self.by_request.clear()
        self.keys.clear()
        self.sessions.clear()
        self.faults.clear()
        for seq in failed:
            seq.sink(Failed(seq.request.request_id, error))
        self.reset()

    def close(self) -> None:
        if self.has_work():
            self.fail_all(MlxServerError(f'model "{self.name}" was unloaded'))
        self.generator.close()
        # The pool drops its entry after this returns; clearing here lets gc free the weights right away.
        self.generator = None  # type: ignore[assignment]
        self.model = None
