"""Per-sequence samplers and logits processors.

The top-k / top-p / min-p filters are written here as plain MLX ops rather than taken from mlx_lm: mlx_lm
compiles its filters with the value baked in, so every new top_p or min_p a client sends costs a fresh
compile (seconds on the CPU backend, stalling every stream), and a value it rejects raises inside a compiled
function that shares the global random state, breaking sampling for everyone after.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, cast

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

from mlx_server.contract.requests import SamplingParams

Filter = Callable[[mx.array], mx.array]
NEG_INF = -float("inf")


def top_k_filter(k: int) -> Filter:
    def apply(logprobs: mx.array) -> mx.array:
        if k >= logprobs.shape[-1]:
            return logprobs
        # The k-th largest value is the cut; ties at the cut all survive, which only ever keeps more.
        kth = mx.take(mx.sort(logprobs, axis=-1), mx.array([logprobs.shape[-1] - k]), axis=-1)
        return mx.where(logprobs < kth, NEG_INF, logprobs)

    return apply


def top_p_filter(p: float) -> Filter:
    def apply(logprobs: mx.array) -> mx.array:
        ascending = mx.sort(logprobs, axis=-1)
        probs = mx.exp(ascending.astype(mx.float32))
        # Probability mass strictly above each position; a token is dropped when that mass already reaches p.
        above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
        total = above[..., :1] + probs[..., :1]
        dropped = (above >= p * total).sum(axis=-1, keepdims=True)
        cut = mx.take_along_axis(ascending, dropped, axis=-1)
        return mx.where(logprobs < cut, NEG_INF, logprobs)

    return apply


def min_p_filter(p: float) -> Filter:
    offset = math.log(min(p, 1.0))

    def apply(logprobs: mx.array) -> mx.array:
        floor = mx.max(logprobs, axis=-1, keepdims=True) + offset
        return mx.where(logprobs < floor, NEG_INF, logprobs)

    return apply


class Sampler:
    """A sequence's sampler: its filters, temperature and (seeded) random key. Besides sampling it can judge a
    drafted token by the speculative-sampling rule: with a deterministic draft (prompt lookup, a greedy draft model)
    the draft is accepted with the target's probability q(d), and on rejection the token is drawn from q with d
    removed, which keeps the output distributed exactly as q (Leviathan et al. 2023, with a one-hot proposal)."""

    def __init__(self, params: SamplingParams) -> None:
        self.chain: list[Filter] = []
        if 0 < params.top_p < 1.0:
            self.chain.append(top_p_filter(params.top_p))
        if params.min_p > 0:
            self.chain.append(min_p_filter(params.min_p))
        if params.top_k > 0:
            self.chain.append(top_k_filter(params.top_k))
        self.inv_temp = 1.0 / params.temperature
        # mx.random.key takes a uint64 only: wrap any int (negative, huge) into range.
        self.key: Optional[mx.array] = mx.random.key(params.seed % 2**64) if params.seed is not None else None

    def _subkey(self) -> Optional[mx.array]:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def weights(self, logprobs: mx.array) -> mx.array:
        """The logits the token is drawn from: filtered, then tempered."""
        for step in self.chain:
            logprobs = step(logprobs)
        return logprobs * self.inv_temp

    def __call__(self, logprobs: mx.array) -> mx.array:
        return mx.random.categorical(self.weights(logprobs), key=self._subkey())

    def accept(self, logprobs: mx.array, token: int) -> bool:
        weights = self.weights(logprobs)
        q = mx.exp(weights[..., token] - mx.logsumexp(weights, axis=-1))
        u = mx.random.uniform(key=self._subkey())
        return bool((u < q).item())

    def residual(self, logprobs: mx.array, token: int) -> mx.array:
        weights = self.weights(logprobs)
        rejected = mx.arange(weights.shape[-1]) == token
        return mx.random.categorical(mx.where(rejected, NEG_INF, weights), key=self._subkey())


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """A per-sequence sampler; a seed gives the sequence its own key so batching never changes its draws."""
    if params.greedy:
        # One shared object lets BatchGenerator sample all greedy sequences in a single batched argmax.
        return greedy_sampler
    return Sampler(params)


def accept_draft(sampler: Any, logprobs: mx.array, token: int) -> bool:
    """Whether `sampler`'s sequence keeps drafted `token` given the target's `logprobs` (greedy: the argmax)."""
    judge = getattr(sampler, "accept", None)
    if judge is None:
        return _token(mx.argmax(logprobs, axis=-1)) == token
    return bool(judge(logprobs, token))


def replace_draft(sampler: Any, logprobs: mx.array, token: int) -> int:
    """The token a sequence takes where it rejected drafted `token`."""
    redraw = getattr(sampler, "residual", None)
    if redraw is None:
        return _token(mx.argmax(logprobs, axis=-1))
    return _token(redraw(logprobs, token))


def _token(sampled: mx.array) -> int:
    return int(cast(int, sampled.item()))


def make_processors(params: SamplingParams, num_ctx: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
    # Ollama: repeat_last_n 0 disables the penalty window, -1 means the whole context.
    window = num_ctx if params.repeat_last_n < 0 else params.repeat_last_n
    if window == 0:
        return []
    return make_logits_processors(
        repetition_penalty=params.repeat_penalty if params.repeat_penalty != 1.0 else None,
        repetition_context_size=window,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=window,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=window,
    )


# One request's sampler and processors run inside the whole batch's step; these wrappers keep a failure its own:
# what they raise is recorded in `faults` (request_id → exception) for the runner to fail that request alone.


def guard_processors(chain: list[Any], request_id: int, faults: dict[int, Exception]) -> list[Any]:
    """One request's processors, isolated: if they raise, that request fails and the batch goes on."""
    if not chain:
        return []  # no per-sequence work at all keeps BatchGenerator on its all-batched path

    def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
        if request_id in faults:
            return logits
        try:
            out = logits
            for processor in chain:
                out = processor(tokens, out)
            return out
        except Exception as exc:  # noqa: BLE001 - contained to this request, reported by the runner
            faults[request_id] = exc
            return logits

    return [guarded]


class GuardedSampler:
    """One request's sampler, isolated: if it raises, that request fails (recorded in `faults`), the batch goes on
    with a greedy token in its place."""

    def __init__(self, sampler: Sampler, request_id: int, faults: dict[int, Exception]) -> None:
        self.sampler = sampler
        self.request_id = request_id
        self.faults = faults

    def _fault(self, exc: Exception) -> None:
        self.faults[self.request_id] = exc

    def __call__(self, logprobs: mx.array) -> mx.array:
        try:
            return self.sampler(logprobs)
        except Exception as exc:  # noqa: BLE001 - contained to this request
            self._fault(exc)
            return greedy_sampler(logprobs)

    def accept(self, logprobs: mx.array, token: int) -> bool:
        try:
            return self.sampler.accept(logprobs, token)
        except Exception as exc:  # noqa: BLE001 - contained to this request
            self._fault(exc)
            return False

    def residual(self, logprobs: mx.array, token: int) -> mx.array:
        try:
            return self.sampler.residual(logprobs, token)
        except Exception as exc:  # noqa: BLE001 - contained to this request
            self._fault(exc)
            return greedy_sampler(logprobs)


def guard_sampler(sampler: Any, request_id: int, faults: dict[int, Exception]) -> Any:
    if sampler is greedy_sampler:
        return sampler  # mlx_lm's own argmax, shared so greedy sequences sample in one batched call
    return GuardedSampler(sampler, request_id, faults)


def first_token(
    model: Any, tokens: list[int], cache: list[Any], sampler: Any, processors: list[Any]
) -> tuple[int, mx.array]:
    """A prefilled prompt's last pass, sampled as BatchGenerator samples a step (processors on the logits, the
    sampler on the log-probabilities): its first token and that token's log-probabilities."""
    logits = model(mx.array(tokens[-1:])[None], cache=cache)[:, -1, :]
    context = mx.array(tokens)
    for processor in processors:
        logits = processor(context, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = sampler(logprobs)
    mx.eval(token, logprobs)
    return int(token.item()), logprobs[0]
