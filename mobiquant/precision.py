"""Per-call precision: how many slices each token uses while a model runs.

The value lives in a ``ContextVar``, not in the modules: each thread (and each asyncio task) sees its own, so two
threads can run one model at two precisions, and the precision can change between two decode steps of a generation.

    with mobiquant.precision(k=2):                # every token, every quantized linear: the first 2 slices
        logits = model(input_ids).logits
    with mobiquant.precision(k=per_token):        # LongTensor shaped like input_ids (B, T): k per token
        logits = model(input_ids).logits

Outside any ``precision`` block a quantized linear uses all of its slices.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """k: active slices, an int for all tokens or a LongTensor of per-token counts shaped like the tokens (B, T)."""

    k: int | torch.Tensor | None = None


_CURRENT: ContextVar[Precision | None] = ContextVar("mobiquant_precision", default=None)


@contextmanager
def precision(k: int | torch.Tensor | None = None) -> Iterator[Precision]:
    """Run the enclosed model calls with ``k`` slices (see the module docstring)."""
    if isinstance(k, bool) or not (k is None or isinstance(k, (int, torch.Tensor))):
        raise TypeError(f"k must be an int or a LongTensor of per-token slice counts, got {type(k).__name__}")
    p = Precision(k=k)
    token = _CURRENT.set(p)
    try:
        yield p
    finally:
        _CURRENT.reset(token)


def current_precision() -> Precision | None:
    return _CURRENT.get()
