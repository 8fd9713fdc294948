"""Step 4 of the data flow: a bit budget -> per-token slice counts, by router thresholds or at random.

``ThresholdTable`` maps a budget (average bits) to each layer's router threshold τ, from calibration statistics
stored in the checkpoint:

* ``"layer"``: every quantized linear realizes the budget on its own. Calibration fits τ on held-out calibration
  tokens at a grid of budgets, with the blocks upstream running at that same budget (their precision changes the
  activations the router sees); between grid points τ is interpolated. Checkpoints without the grid fall back to
  bisection on the stored scores.
* ``"global"``: one τ for all layers, chosen by bisection on the stored calibration scores (gathered at the middle
  budget) so that the weight-weighted average over layers realizes the budget: layers whose scores are high get
  more slices.

Tables are computed once per budget and cached; a budget is a per-call value (``precision(budget=...)``), so the
table holds no state that depends on who is calling.
"""

from __future__ import annotations

import threading

import torch

from .errors import MoBiQuantError
from .nn.router import nested_counts, realized_bits, threshold_for_bits

THRESHOLD_MODES = ("layer", "global")
_CACHE_LIMIT = 512


class ThresholdTable:
    def __init__(self, linears: dict, mode: str = "layer"):
        if mode not in THRESHOLD_MODES:
            raise MoBiQuantError(f"unknown threshold mode {mode!r}; use one of {THRESHOLD_MODES}")
        self.mode = mode
        self.linears = {n: m for n, m in linears.items() if getattr(m, "router", None) is not None}
        for n, m in self.linears.items():
            if m.router.calib_scores.numel() == 0:
                raise MoBiQuantError(f"the router of {n} has no calibration scores: calibrate the model first")
        self._cache: dict[float, dict[str, float]] = {}
        self._lock = threading.Lock()

    def tau(self, name: str, bits: float) -> float:
        table = self._cache.get(bits)
        if table is None:
            with self._lock:
                table = self._cache.get(bits)
                if table is None:
                    if len(self._cache) >= _CACHE_LIMIT:
                        self._cache.clear()
                    table = self._cache[bits] = self._build(bits)
        return table[name]

    def _build(self, bits: float) -> dict[str, float]:
        if self.mode == "layer":
            out = {}
            for n, m in self.linears.items():
                tau = m.router.threshold(bits)
                out[n] = tau if tau is not None else threshold_for_bits(m.router.calib_scores, m.slice_bits, bits)
            return out
        scores = {n: m.router.calib_scores.float() for n, m in self.linears.items()}
        weights = {n: m.in_features * m.out_features for n, m in self.linears.items()}
        total = sum(weights.values())

        def avg_bits(tau: float) -> float:
            return sum(float(realized_bits(nested_counts(s, tau), self.linears[n].slice_bits)) * weights[n]
                       for n, s in scores.items()) / total

        lo = min(float(s.min()) for s in scores.values()) - 1.0
        hi = max(float(s.max()) for s in scores.values()) + 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if avg_bits(mid) > bits else (lo, mid)
        return dict.fromkeys(scores, hi)


def attach_thresholds_(model: torch.nn.Module, mode: str = "layer") -> ThresholdTable:
    """Give every routed linear of ``model`` one shared budget -> threshold table."""
    from .api import quantized_linears

    table = ThresholdTable(quantized_linears(model), mode)
    for m in table.linears.values():
        m.thresholds = table
    model.mobiquant_thresholds = mode
    return table


def random_counts(shape: torch.Size, slice_bits, bits: float, generator: torch.Generator | None) -> torch.Tensor:
    """Random nested routing with expected average ``bits``: each token independently at one of the two uniform
    precisions around the budget (the baseline the router must beat)."""
    B = torch.tensor(slice_bits).cumsum(0).tolist()
    hi = next((k for k, b in enumerate(B, start=1) if b >= bits - 1e-9), len(B))
    lo = max(hi - 1, 1)
    if hi == lo or B[hi - 1] == bits:
        return torch.full(shape, hi, dtype=torch.long)
    p_hi = (bits - B[lo - 1]) / (B[hi - 1] - B[lo - 1])
    return torch.where(torch.rand(shape, generator=generator) < p_hi, hi, lo)
