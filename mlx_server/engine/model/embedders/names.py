"""Checkpoint tensor names → an embedder module's: shared by every architecture's `sanitize`."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx


def encoder_tensors(
    weights: dict[str, mx.array],
    prefixes: tuple[str, ...],
    dropped: tuple[str, ...],
    skipped_suffixes: tuple[str, ...] = (),
) -> Iterator[tuple[str, mx.array]]:
    """(name, tensor) for the encoder's own tensors: a task model's prefix (`bert.`, `model.`, …) removed, its heads
    (`dropped` prefixes) and buffers we recompute (`skipped_suffixes`, e.g. position_ids, inv_freq) left out."""
    for name, value in weights.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name.startswith(dropped) or (skipped_suffixes and name.endswith(skipped_suffixes)):
            continue
        yield name, value


__all__ = ["encoder_tensors"]
