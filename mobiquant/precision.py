"""Per-call precision: how many slices each token uses while a model runs.

The value lives in a ``ContextVar``, not in the modules: each thread (and each asyncio task) sees its own, so two
threads can run one model at two precisions, and the precision can change between two decode steps of a generation.

    with mobiquant.precision(k=2):                # every token, every quantized linear: the first 2 slices
        logits = model(input_ids).logits
    with mobiquant.precision(k=per_token):        # LongTensor shaped like input_ids (B, T): k per token
        ...
    with mobiquant.precision(budget=3.5):         # the routers pick k per token and layer; 3.5 bits on average
        ...
    with mobiquant.precision(budget=3.5, mode="random", seed=0):   # baseline: random nested routing, same bits
        ...
    trace = mobiquant.RoutingTrace()
    with mobiquant.precision(budget=3.5, trace=trace):   # every quantized linear records its slice counts
        ...

Outside any ``precision`` block a quantized linear uses all of its slices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .errors import MoBiQuantError

MODES = ("router", "random")


@dataclass(frozen=True)
class Precision:
    """k: active slices, an int for all tokens or a LongTensor shaped like the tokens (B, T); else
    budget: average bits, turned into slice counts by each layer's router (mode "router") or at random (mode
    "random", the baseline); trace: a RoutingTrace that records what every quantized linear used."""

    k: int | torch.Tensor | None = None
    budget: float | None = None
    mode: str = "router"
    trace: object | None = None
    generator: torch.Generator | None = field(default=None, compare=False)
    fit: dict | None = field(default=None, compare=False)  # calibration: {layer name: τ} fitted on this call
    stream: dict | None = field(default=None, compare=False)  # adaptive thresholds: score history of one text
    tally: dict = field(default_factory=dict, compare=False)  # balanced thresholds: each token's slices so far


def check_budget(budget, low: float | None = None, high: float | None = None) -> float:
    """A finite number (within [low, high] when given), else a clear MoBiQuantError."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise MoBiQuantError(f"the bit budget must be a number, got {budget!r}")
    budget = float(budget)
    if math.isnan(budget) or math.isinf(budget) or budget <= 0:
        raise MoBiQuantError(f"the bit budget must be a positive finite number of bits, got {budget}")
    if low is not None and high is not None and not low - 1e-9 <= budget <= high + 1e-9:
        raise MoBiQuantError(f"bit budget {budget:g} is outside this model's range {low:g}..{high:g} bits")
    return budget


_CURRENT: ContextVar[Precision | None] = ContextVar("mobiquant_precision", default=None)


@contextmanager
def precision(k: int | torch.Tensor | None = None, *, budget: float | None = None, mode: str = "router",
              trace=None, seed: int | None = None, fit: dict | None = None,
              stream: dict | None = None) -> Iterator[Precision]:
    """Run the enclosed model calls at ``k`` slices or at a ``budget`` of average bits (module docstring)."""
    if isinstance(k, bool) or not (k is None or isinstance(k, (int, torch.Tensor))):
        raise TypeError(f"k must be an int or a LongTensor of per-token slice counts, got {type(k).__name__}")
    if k is not None and budget is not None:
        raise MoBiQuantError("give either k (slices) or budget (bits), not both")
    if budget is not None:
        budget = check_budget(budget)
    if mode not in MODES:
        raise MoBiQuantError(f"unknown routing mode {mode!r}; use one of {MODES}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    p = Precision(k=k, budget=budget, mode=mode, trace=trace, generator=gen, fit=fit, stream=stream)
    token = _CURRENT.set(p)
    try:
        yield p
    finally:
        _CURRENT.reset(token)


def current_precision() -> Precision | None:
    return _CURRENT.get()
