"""One generating sequence's state in its model's worker (engine/model/runner.py), its usage, and the policy of
Ollama's context shift: when a sequence may go on past a full window, and what it keeps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlx_server.contract.events import Delta, Sink, Usage
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.loop.prefill import PrefillJob
from mlx_server.engine.model.output import SequenceOutput

log = logging.getLogger("mlx_server.engine")

# Ollama's bound on a generation without num_predict that context shifts keep going: ten windows.
SHIFT_WINDOWS = 10
# A window with fewer free tokens after the kept head than this cannot shift: each shift would gain nothing.
MIN_SHIFT_ROOM = 4


@dataclass
class Sequence:
    request: GenerateRequest
    sink: Sink
    uid: Optional[int]  # its BatchGenerator uid once it joined the batch; None while its prompt is prefilled
    out: SequenceOutput
    prompt_tokens: int
    cached_tokens: int
    load_duration: float
    admitted_at: float
    first_token_at: Optional[float] = None
    generated: int = 0
    deadline: Optional[float] = None
    processors: list[Any] = field(default_factory=list)  # this sequence's logits processors, run under a guard
    kv_tokens: int = 0  # the most KV it can hold (prompt + budget, within num_ctx): its memory reservation
    max_tokens: int = 0
    job: Optional[PrefillJob] = None  # its prompt's prefill, until it joins the batch
    key: Optional[list[int]] = None  # its prompt as the prompt cache keys it (images salted in), when not its tokens
    rope_shift: int = 0  # decode positions ahead of its cache length (Qwen-VL's mRoPE)
    num_draft: int = 0  # tokens it drafts per step (0: it steps undrafted)
    drafted: int = 0
    accepted: int = 0
    num_ctx: int = 0
    keep: int = 0  # tokens at its prompt's head a context shift keeps
    history: list[int] = field(default_factory=list)  # prompt and generated tokens, while it may shift
    shifts: int = 0
    grammar: bool = False  # constrained: its grammar processors count the tokens they were shown, so it cannot shift

    def take(self, token: int, logprobs: Any, eos: bool, now: float) -> Optional[Delta]:
        """Count a generated token and feed it to the output side; the Delta it makes visible, if any."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated += 1
        if self.request.shift:
            self.history.append(token)
        return self.out.add(token, logprobs, eos=eos)


def usage(seq: Sequence, now: float) -> Usage:
    # Ollama's clock: total from the request's arrival (queueing and loading included), prompt eval from
    # admission to the first token, eval from there on.
    first = seq.first_token_at or now
    return Usage(
        prompt_tokens=seq.prompt_tokens,
        cached_tokens=seq.cached_tokens,
        completion_tokens=seq.generated,
        load_duration=seq.load_duration,
        prompt_eval_duration=first - seq.admitted_at,
        eval_duration=now - first,
        total_duration=max(now - seq.request.created, seq.load_duration + (now - seq.admitted_at)),
        draft_tokens=seq.drafted,
        draft_accepted=seq.accepted,
    )


def shift_limit(seq: Sequence) -> int:
    """The most a shifting sequence generates: its max tokens, within ten windows (endless otherwise)."""
    wanted = seq.request.max_tokens
    bound = SHIFT_WINDOWS * seq.num_ctx
    return min(wanted, bound) if wanted is not None and wanted > 0 else bound


def shifts(seq: Sequence) -> bool:
    """Whether a sequence its window ended goes on after a context shift (else it ends with "length")."""
    if not seq.request.shift or seq.generated >= shift_limit(seq):
        return False
    why = None
    if seq.key is not None or seq.rope_shift:
        why = "its images' features sit in the dropped part's positions"
    elif seq.grammar:
        why = "its grammar tracks every token it has generated"
    elif seq.num_ctx - seq.keep < MIN_SHIFT_ROOM:
        why = f"the kept head ({seq.keep} tokens) fills its window ({seq.num_ctx})"
    if why is not None:
        log.info("request %d reached num_ctx=%d and cannot shift: %s", seq.request.request_id, seq.num_ctx, why)
        return False
    return True


def shift_tokens(seq: Sequence) -> tuple[list[int], int]:
    """The sequence's tokens after a shift (its history updated to them), and how many were dropped: the older
    half of what follows the kept head, as Ollama's runner drops."""
    keep = seq.keep
    discard = (seq.num_ctx - keep) // 2
    seq.history = seq.history[:keep] + seq.history[keep + discard :]
    seq.shifts += 1
    return list(seq.history), discard


def keep_head(cache: list[Any], keep: int) -> bool:
    """Cut a finished sequence's KV down to its first `keep` tokens in place, where its cache can be cut."""
    held = int(getattr(cache[0], "offset", 0))
    if not 0 < keep <= held or not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, held - keep)
    return True


__all__ = ["MIN_SHIFT_ROOM", "SHIFT_WINDOWS", "Sequence", "keep_head", "shift_limit", "shift_tokens", "shifts", "usage"]
