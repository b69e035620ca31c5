"""Our uncompiled filters agree with mlx_lm's, and values mlx_lm rejects cannot break sampling."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlx_server.engine.model.sampling import make_sampler, min_p_filter, top_k_filter, top_p_filter
from mlx_server.contract.requests import SamplingParams


@pytest.fixture(scope="module")
def logprobs() -> mx.array:
    logits = mx.random.normal((3, 500), key=mx.random.key(0)) * 3
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kept(x: mx.array) -> list[list[bool]]:
    return (x > -float("inf")).tolist()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_mlx_lm(logprobs: mx.array, p: float) -> None:
    assert kept(top_p_filter(p)(logprobs)) == kept(apply_top_p(logprobs, p))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_mlx_lm(logprobs: mx.array, p: float) -> None:
    assert kept(min_p_filter(p)(logprobs)) == kept(apply_min_p(logprobs, p))


@pytest.mark.parametrize("k", [1, 5, 40, 499])
def test_top_k_matches_mlx_lm(logprobs: mx.array, k: int) -> None:
    assert kept(top_k_filter(k)(logprobs)) == kept(apply_top_k(logprobs, k))


def test_out_of_range_values_are_harmless(logprobs: mx.array) -> None:
    row = logprobs[:1]
    for params in (SamplingParams(temperature=1.0, min_p=5.0), SamplingParams(temperature=1.0, top_k=10**12),
                   SamplingParams(temperature=1.0, seed=-3), SamplingParams(temperature=1.0, seed=2**70)):
        token = make_sampler(params)(row)
        mx.eval(token)
    # and plain unseeded sampling still works afterwards
    assert 0 <= make_sampler(SamplingParams(temperature=0.7))(row).item() < 500
