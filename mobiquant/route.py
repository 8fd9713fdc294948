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
* ``"adaptive"``: per layer, τ is the quantile that realizes the budget over the scores this stream of text has
  produced so far, topped up with stored calibration scores while it has fewer than 256, and the fitted "layer"
  threshold before it has any (causal: tokens are taken in chunks of 64 along the sequence,
  each chunk thresholded on what came before it; a generation carries its history from step to step in the
  caller's ``precision(stream=...)`` dict). The calibration text and the user's text differ; this mode follows the
  user's text, so the realized bits track the budget where fixed thresholds drift.

* ``"balanced"`` (band and fisher allocations): each token runs at one of the two precisions around the budget, as
  in "band", but the decision also looks at what the token got in the linears before this one in the same forward:

      on_t = F(s_t) + λ · (want_t − hi_t) > 1 − p

  F is the layer's calibration-score CDF (so F(s) > 1 − p alone is the "layer" threshold at fraction p of tokens on
  the higher precision), hi_t counts the weights of the linears the token has passed where it got the higher
  precision and want_t the weights it should have had there (p times each linear's weights, in units of the mean
  linear), λ = ``BALANCE``. A token that was denied the extra slice
  in earlier layers is pushed up, one that got it is pushed down: every token ends near the budget, and the router
  picks *where* in the network each token spends it. The independent per-layer thresholds instead give the extra
  slices to the same tokens in most layers and starve the rest, which lost to random routing on WikiText-2 (README,
  issue #3). Causal and per token: a decode step (one token, one forward) decides exactly as a prefill would. The
  record lives in ``precision(...).tally``, reset when a forward starts again at a linear it has seen.

Allocations (where the budget goes): "nested" (any count 1..E where the scores cross τ), "band" (every linear at the
budget: the two uniform precisions around it) and "fisher" (balanced thresholds only): each linear gets its own share
b_l of the budget from its cost curve (calibrate/fisher.py, ``fisher_allocation``), the weight-weighted mean of the
b_l being the budget, and its tokens run at the two precisions around b_l, the balanced rule above with p = p_l and
the token's deficit counted against the shares (``want``). Sensitive linears (e.g. the first blocks' down
projections) then run at more bits than robust ones at every budget, integer budgets included, where "band" is one
uniform precision.

Tables are computed once per budget and cached; a budget is a per-call value (``precision(budget=...)``), so the
table holds no state that depends on who is calling.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import threading

import torch

from .errors import MoBiQuantError
from .nn.router import nested_counts, realized_bits, threshold_for_bits

THRESHOLD_MODES = ("layer", "global", "adaptive", "balanced")
BALANCE = 0.13  # λ (fast 3,1,1,1,1,1 checkpoint, WikiText-2, 4 windows, 3.5 bits: 0.06 -> 55.13, 0.13 -> 54.70,
#                0.3 -> 56.65; per-layer adaptive thresholds 58.53, random routing 59.94)
ALLOCATIONS = ("nested", "band", "fisher")
ADAPTIVE_CHUNK = 64  # tokens per causal chunk of the adaptive mode
ADAPTIVE_HISTORY = 2048  # most recent scores of a stream kept by the adaptive mode
ADAPTIVE_PRIOR = 256  # calibration scores stand in for the stream's until it has this many of its own
_CACHE_LIMIT = 512


def band_scores(scores: torch.Tensor, slice_bits, bits: float) -> torch.Tensor:
    """Restrict nested routing to the two uniform precisions around ``bits``: residual slices up to k_lo always on
    (+inf), slice k_hi on by its own score, slices above never (-inf). nested_counts of the result is k_lo or k_hi."""
    k_hi = _band_top(tuple(slice_bits), bits)
    out = torch.full_like(scores, float("-inf"))
    out[..., : k_hi - 2 if k_hi >= 2 else 0] = float("inf")  # residual index e-2 holds slice e
    if k_hi >= 2:
        out[..., k_hi - 2] = scores[..., k_hi - 2]
    return out


@functools.lru_cache(maxsize=256)
def _band(slice_bits: tuple[int, ...], bits: float) -> tuple[int, int, float]:
    """(k_lo, k_hi, p): the two uniform precisions around ``bits`` and the fraction p of (token, linear) pairs that
    must take k_hi for an average of ``bits`` (k_lo = k_hi, p = 1 at a uniform precision)."""
    k_hi = _band_top(slice_bits, bits)
    B = list(itertools.accumulate(slice_bits))
    if k_hi == 1 or B[k_hi - 1] <= bits + 1e-9:
        return k_hi, k_hi, 1.0
    return k_hi - 1, k_hi, (bits - B[k_hi - 2]) / (B[k_hi - 1] - B[k_hi - 2])


@functools.lru_cache(maxsize=256)
def forced_count(slice_bits: tuple[int, ...], bits: float) -> int | None:
    """The slice count every token gets at an extreme budget, whatever its scores: 1 at B_1 and E at B_E (an average
    of B_1 bits leaves no token room for a residual slice, B_E needs all of them); None between them."""
    if bits <= slice_bits[0] + 1e-9:
        return 1
    if bits >= sum(slice_bits) - 1e-9:
        return len(slice_bits)
    return None


@functools.lru_cache(maxsize=256)
def _band_top(slice_bits: tuple[int, ...], bits: float) -> int:
    """k_hi: the fewest slices whose precision B_k reaches ``bits``."""
    B = list(itertools.accumulate(slice_bits))
    return next((k for k, b in enumerate(B, start=1) if b >= bits - 1e-9), len(B))


class ThresholdTable:
    """Budget -> per-token slice counts for a model's routed linears (module docstring).

    allocation "nested": any count 1..E, a token's count set by where its scores cross τ; "band": only the two
    uniform precisions around the budget, the router choosing which tokens get the higher one.
    """

    def __init__(self, linears: dict, mode: str = "layer", allocation: str = "nested"):
        if mode not in THRESHOLD_MODES:
            raise MoBiQuantError(f"unknown threshold mode {mode!r}; use one of {THRESHOLD_MODES}")
        if allocation not in ALLOCATIONS:
            raise MoBiQuantError(f"unknown allocation {allocation!r}; use one of {ALLOCATIONS}")
        if mode == "balanced" and allocation == "nested":
            raise MoBiQuantError("the balanced threshold mode needs the band or fisher allocation")
        if allocation == "fisher" and mode != "balanced":
            raise MoBiQuantError("the fisher allocation runs with the balanced threshold mode")
        self.mode, self.allocation = mode, allocation
        self.linears = {n: m for n, m in linears.items() if getattr(m, "router", None) is not None}
        for n, m in self.linears.items():
            if m.router.calib_scores.numel() == 0:
                raise MoBiQuantError(f"the router of {n} has no calibration scores: calibrate the model first")
            if allocation == "fisher" and m.router.fisher_cost.numel() == 0:
                raise MoBiQuantError(f"the router of {n} has no cost curve for the fisher allocation: calibrate again, "
                                     "or run mobiquant.calibrate.fit_fisher_ on the model")
        self._cache: dict[float, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._sizes = {n: m.in_features * m.out_features for n, m in self.linears.items()}
        mean = sum(self._sizes.values()) / max(len(self._sizes), 1)
        self._unit = {n: s / mean for n, s in self._sizes.items()}  # weights / mean
        self._cdf: dict[tuple, torch.Tensor | list[float]] = {}  # (name, k_hi, device or "list") -> sorted scores
        self._bands: dict[float, dict[str, tuple[int, int, float]]] = {}  # fisher: budget -> name -> band

    def _prior(self, name: str, bits: float) -> torch.Tensor:
        m = self.linears[name]
        prior = m.router.calib_scores.float()
        return band_scores(prior, m.slice_bits, bits) if self.allocation != "nested" else prior

    def counts(self, name: str, scores: torch.Tensor, bits: float, stream: dict | None = None,
               tally: dict | None = None) -> torch.Tensor:
        """(..., E-1) router scores -> (...) slice counts at ``bits``."""
        m = self.linears[name]
        k = forced_count(tuple(m.slice_bits), bits)
        if k is not None:  # B_1 or B_E: nothing to allocate (τ fitted on calibration text could let a token over)
            return torch.full(scores.shape[:-1], k, dtype=torch.long, device=scores.device)
        if self.mode == "balanced":
            k_lo, k_hi, p = self.band(name, bits)
            if k_lo == k_hi:
                return torch.full(scores.shape[:-1], k_hi, dtype=torch.long, device=scores.device)
            F = self._quantile(name, k_hi, scores[..., k_hi - 2])
            t = _tally(tally if tally is not None else {}, name, tuple(F.shape), lambda: torch.zeros_like(F))
            on = F + BALANCE * (t["want"] - t["hi"]) > 1 - p
            t["hi"] += self._unit[name] * on
            t["want"] += self._unit[name] * p
            return k_lo + on.long() * (k_hi - k_lo)
        if self.allocation == "band" and self.mode != "adaptive":  # = nested_counts(band_scores(...), τ), cheaper
            k_hi = _band_top(m.slice_bits, bits)
            if k_hi == 1:
                return torch.ones(scores.shape[:-1], dtype=torch.long, device=scores.device)
            return (k_hi - 1) + (scores[..., k_hi - 2] > self.tau(name, bits)).long()
        if self.allocation == "band":
            scores = band_scores(scores, m.slice_bits, bits)
        if self.mode != "adaptive":
            return nested_counts(scores, self.tau(name, bits))
        prior = self._prior(name, bits)
        key = (name, self.allocation, bits) if self.allocation == "band" else (name,)
        seen = stream.get(key) if stream is not None else None
        s3 = scores.reshape(-1, scores.shape[-2], scores.shape[-1]) if scores.dim() >= 2 else scores[None, None]
        counts = torch.empty(s3.shape[:2], dtype=torch.long, device=scores.device)
        n_seen = 0 if seen is None else seen.shape[0]
        for c in range(0, s3.shape[1], ADAPTIVE_CHUNK):  # causal: each chunk is thresholded on what came before
            own = s3[:, :c].reshape(-1, s3.shape[-1]).float()
            if n_seen + own.shape[0] == 0:  # nothing of this text yet: the fitted threshold
                tau = self.tau(name, bits)
            else:
                pool = [prior[: max(0, ADAPTIVE_PRIOR - n_seen - own.shape[0])], own]
                pool += [seen] if seen is not None else []
                tau = threshold_for_bits(torch.cat(pool), m.slice_bits, bits)
            counts[:, c : c + ADAPTIVE_CHUNK] = nested_counts(s3[:, c : c + ADAPTIVE_CHUNK], tau)
        if stream is not None:
            new = s3.reshape(-1, s3.shape[-1]).detach().float()
            stream[key] = new if seen is None else torch.cat([seen, new])[-ADAPTIVE_HISTORY:]
        return counts.reshape(scores.shape[:-1])

    def count_token(self, name: str, scores: list[float], bits: float, tally: dict | None = None) -> int:
        """``counts`` for one token's (E-1) scores given as floats: the same count, computed in Python (the CPU
        decode path). Not for the adaptive mode, which needs the score history."""
        m = self.linears[name]
        k = forced_count(tuple(m.slice_bits), bits)
        if k is not None:
            return k
        if self.mode == "balanced":
            k_lo, k_hi, p = self.band(name, bits)
            if k_lo == k_hi:
                return k_hi
            cdf = self._cdf_list(name, k_hi)
            F = bisect.bisect_left(cdf, scores[k_hi - 2]) / len(cdf)
            t = _tally(tally if tally is not None else {}, name, (), float)
            on = F + BALANCE * (t["want"] - t["hi"]) > 1 - p
            t["hi"] += self._unit[name] * on
            t["want"] += self._unit[name] * p
            return k_hi if on else k_lo
        tau = self.tau(name, bits)
        if self.allocation == "band":
            k_hi = _band_top(m.slice_bits, bits)
            return 1 if k_hi == 1 else k_hi - 1 + int(scores[k_hi - 2] > tau)
        n = 1
        for s in scores:  # nested: residual slice e only if slice e-1
            if not s > tau:
                break
            n += 1
        return n

    def band(self, name: str, bits: float) -> tuple[int, int, float]:
        """(k_lo, k_hi, p): the two precisions a linear's tokens run at for a budget, and the fraction p at k_hi.
        Allocation "band": the uniform precisions around the budget; "fisher": the linear's share of the budget."""
        if self.allocation != "fisher":
            return _band(self.linears[name].slice_bits, bits)
        bands = self._bands.get(bits)
        if bands is None:
            with self._lock:
                if len(self._bands) >= _CACHE_LIMIT:
                    self._bands.clear()
                target = fisher_allocation(self._curves(), self._sizes, bits)
                bands = self._bands[bits] = {n: _band(self.linears[n].slice_bits, round(b, 9))
                                             for n, b in target.items()}
        return bands[name]

    def _curves(self) -> dict[str, tuple[list[float], list[float]]]:
        return {n: (m.router.fisher_bits.tolist(), m.router.fisher_cost.tolist()) for n, m in self.linears.items()}

    def _quantile(self, name: str, k_hi: int, s: torch.Tensor) -> torch.Tensor:
        """F(s): the fraction of the layer's calibration tokens whose score for slice k_hi is below s."""
        key = (name, k_hi, s.device)
        cdf = self._cdf.get(key)
        if cdf is None:
            cdf = self._cdf[key] = self._sorted_calib(name, k_hi).to(s.device)
        return torch.searchsorted(cdf, s.float().contiguous()).float() / cdf.numel()

    def _cdf_list(self, name: str, k_hi: int) -> list[float]:
        key = (name, k_hi, "list")
        cdf = self._cdf.get(key)
        if cdf is None:
            cdf = self._cdf[key] = self._sorted_calib(name, k_hi).tolist()
        return cdf

    def _sorted_calib(self, name: str, k_hi: int) -> torch.Tensor:
        return self.linears[name].router.calib_scores[:, k_hi - 2].float().cpu().sort().values

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
        if self.mode in ("layer", "adaptive", "balanced"):
            out = {}
            for n, m in self.linears.items():
                tau = m.router.threshold(bits) if self.allocation == "nested" else None
                out[n] = tau if tau is not None else threshold_for_bits(self._prior(n, bits), m.slice_bits, bits)
            return out
        scores = {n: self._prior(n, bits) for n in self.linears}
        weights = {n: m.in_features * m.out_features for n, m in self.linears.items()}
        total = sum(weights.values())

        def avg_bits(tau: float) -> float:
            return sum(float(realized_bits(nested_counts(s, tau), self.linears[n].slice_bits)) * weights[n]
                       for n, s in scores.items()) / total

        finite = [s[torch.isfinite(s)] for s in scores.values()]
        lo = min((float(f.min()) for f in finite if f.numel()), default=0.0) - 1.0
        hi = max((float(f.max()) for f in finite if f.numel()), default=0.0) + 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if avg_bits(mid) > bits else (lo, mid)
        return dict.fromkeys(scores, hi)


def fisher_allocation(curves: dict[str, tuple[list[float], list[float]]], sizes: dict[str, int],
                      bits: float) -> dict[str, float]:
    """Each linear's bits for a model-wide average of ``bits`` (weighted by ``sizes``, weights per linear), spending
    the budget where it lowers the estimated loss most per weight bit.

    curves: per linear, the (bits, cost) points of its cost curve (calibrate/fisher.py). On the lower convex hull of
    each curve, a segment from (b0, c0) to (b1, c1) buys c0 - c1 for (b1 - b0) x size weight bits; every linear starts
    at its lowest precision and the segments are taken in order of that gain per bit (the hull keeps each linear's
    segments in order), the last one taken part way so that the budget is met exactly."""
    start = {n: b[0] for n, (b, _) in curves.items()}
    need = sum((bits - start[n]) * sizes[n] for n in curves)
    segments = []
    for n, (b, c) in curves.items():
        hull = _lower_hull(list(zip(b, c)))
        for (b0, c0), (b1, c1) in zip(hull, hull[1:]):
            segments.append(((c0 - c1) / ((b1 - b0) * sizes[n]), b0, n, b1))
    segments.sort(key=lambda s: (-s[0], s[1]))
    out = dict(start)
    for _, b0, n, b1 in segments:
        if need <= 0:
            break
        take = min(b1 - b0, need / sizes[n])
        out[n], need = b0 + take, need - take * sizes[n]
    return out


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of (x, y) points sorted by x (monotone chain), from the first x to the last."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  <= (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])):
            hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to p
        hull.append(p)
    return hull


def _tally(tally: dict, name: str, shape: tuple, zero) -> dict:
    """The balanced mode's record of the current forward: per token, ``hi`` the weights of the linears where it got
    the higher precision and ``want`` the weights it should have had there by the budget (``zero()`` each: tensors of
    the tokens' shape, or floats for one decode token). A new forward starts when a linear comes back or the tokens
    change shape."""
    if name in tally.setdefault("names", set()) or tally.get("shape") != shape:
        tally.update(names=set(), shape=shape, hi=zero(), want=zero())
    tally["names"].add(name)
    return tally


def attach_thresholds_(model: torch.nn.Module, mode: str = "layer", allocation: str = "nested") -> ThresholdTable:
    """Give every routed linear of ``model`` one shared budget -> threshold table, and group the routers of linears
    that read one input (q/k/v, gate/up: nn/shared_input.py) for decoding."""
    from .api import quantized_linears
    from .nn.shared_input import share_router_inputs_

    linears = quantized_linears(model)
    table = ThresholdTable(linears, mode, allocation)
    for m in table.linears.values():
        m.thresholds = table
    share_router_inputs_(linears)
    model.mobiquant_thresholds = mode
    model.mobiquant_allocation = allocation
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
