"""MoBiRoute: a small 2-layer MLP per quantized linear that decides how many slices each token uses (paper §4.2).

    scores = fc2(silu(fc1(x / input_scale)))        x (..., K) -> scores (..., E-1), one per residual slice
    m_e    = Π_{j ≤ e} 1[scores_j > τ]              nested: residual slice e only if slice e-1 (e = 2..E)
    n_t    = 1 + Σ_e m_e                            the first slice is always on (the "shared expert")

A threshold τ turns the scores into slice counts; raising τ lowers the average bits. The budget (average bits) -> τ
map (route.py) uses a sample of the router's scores on the calibration tokens, kept in the checkpoint
(``calib_scores``): for any budget between B_1 and B_E, τ is found by bisection so that the calibration tokens
realize that budget. Training uses a straight-through estimator: hard nested masks forward, the gradient of the
product of sigmoids backward (``ste_nested_mask``).

The MLP's weights are stored in fp16 (the routers stay under 2 % of a checkpoint); the forward runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_HIDDEN = 16
DATA_BUFFERS = ("calib_scores", "tau_bits", "tau", "fisher_bits", "fisher_cost")  # shapes set by calibration
OPTIONAL_BUFFERS = ("fisher_bits", "fisher_cost")  # absent from checkpoints made before them
CALIB_SCORES = 512  # calibration tokens whose scores are kept for the "global" threshold mode


def realized_bits(counts: torch.Tensor, slice_bits: Sequence[int]) -> torch.Tensor:
    """Mean code bits of per-token slice counts n_t: B_{n_t} averaged over tokens."""
    B = torch.tensor([0, *torch.tensor(slice_bits).cumsum(0).tolist()], dtype=torch.float32, device=counts.device)
    return B[counts].mean()


def nested_counts(scores: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """(..., E-1) scores -> (...) slice counts n_t in 1..E (long)."""
    return 1 + torch.cumprod((scores > tau).long(), dim=-1).sum(-1)


def ste_nested_mask(scores: torch.Tensor, tau: float | torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., E-1) residual-slice masks: hard nested 0/1 forward, d(Π sigmoid((s - τ)/T))/ds backward."""
    soft = torch.cumprod(torch.sigmoid((scores - tau) / temperature), dim=-1)
    hard = torch.cumprod((scores > tau).to(scores.dtype), dim=-1)
    return hard + (soft - soft.detach())  # exactly the hard mask forward


def threshold_for_bits(scores: torch.Tensor, slice_bits: Sequence[int], bits: float) -> float:
    """τ such that the nested counts of ``scores`` (T, E-1) realize ``bits`` on average (as close as the tokens
    allow, never below). Exact, by sorting: residual slice e of token t is on iff m_{t,e} = min_{j<=e} s_{t,j} > τ,
    so bits(τ) = b_1 + Σ_{(t,e): m_{t,e} > τ} b_e / T, a step function of τ that falls as τ rises."""
    scores = scores.float().reshape(-1, scores.shape[-1]).cpu()  # a host-side fit, wherever the scores live
    T = scores.shape[0]
    m = torch.cummin(scores, dim=-1).values.flatten()  # (T*(E-1),)
    w = torch.tensor(slice_bits[1:], dtype=torch.float64).repeat(T) / T  # bits each (t, e) adds when on
    order = torch.argsort(m, descending=True)
    m, gained = m[order], torch.cumsum(w[order], 0)  # turning on the i largest m adds gained[i-1] bits
    need = bits - slice_bits[0] - 1e-9
    if need <= 0:
        return float(m[0]) + 1.0  # nothing on
    i = int(torch.searchsorted(gained, torch.tensor(need, dtype=torch.float64)))  # first prefix reaching the need
    if i >= m.numel() - 1:
        return float(m[-1]) - 1.0  # everything on
    return float((m[i] + m[i + 1]) / 2) if m[i] > m[i + 1] else float(m[i]) - 1e-6


class MoBiRoute(nn.Module):
    def __init__(self, in_features: int, num_slices: int, hidden: int = DEFAULT_HIDDEN, device=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, device=device)
        self.fc2 = nn.Linear(hidden, num_slices - 1, device=device)
        # per-channel RMS of the calibration inputs: the MLP sees O(1) features whatever the layer's scale
        self.register_buffer("input_scale", torch.ones(in_features, device=device))
        self.register_buffer("calib_scores", torch.zeros(0, num_slices - 1, device=device))
        # τ fitted at calibration for a grid of budgets, the upstream layers running at that same budget
        self.register_buffer("tau_bits", torch.zeros(0, device=device))
        self.register_buffer("tau", torch.zeros(0, device=device))
        # the linear's cost curve, (bits, estimated loss increase) points (calibrate/fisher.py): the "fisher" allocation
        self.register_buffer("fisher_bits", torch.zeros(0, device=device))
        self.register_buffer("fisher_cost", torch.zeros(0, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> scores (..., E-1), fp32."""
        if torch.is_grad_enabled():  # training: every op on the parameters, for their gradients
            return self.mlp(x.float() / self.input_scale.float())
        w1, b1, w2, b2 = self._inference_weights()  # decode: 3 ops per token instead of 8
        return F.linear(F.silu(F.linear(x.float(), w1, b1)), w2, b2)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP on normalised inputs h = x / input_scale (..., K) -> (..., E-1), differentiable."""
        h = F.silu(F.linear(h, self.fc1.weight.float(), self.fc1.bias.float()))
        return F.linear(h, self.fc2.weight.float(), self.fc2.bias.float())

    def _inference_weights(self) -> tuple[torch.Tensor, ...]:
        """fp32 weights with 1 / input_scale folded into fc1, the same tuple until a parameter or buffer changes:
        in place (its version counter), by assignment (another tensor), or by a move or cast (``_apply``)."""
        fc1, fc2 = self._modules["fc1"], self._modules["fc2"]  # not self.fc1: Module.__getattr__ is slow per token
        tensors = (fc1._parameters["weight"], fc1._parameters["bias"], fc2._parameters["weight"],
                   fc2._parameters["bias"], self._buffers["input_scale"])
        versions = tuple(t._version for t in tensors)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], tensors)):
            w1 = self.fc1.weight.float() / self.input_scale.float()
            folded = (w1, self.fc1.bias.float(), self.fc2.weight.float(), self.fc2.bias.float())
            cached = self.__dict__["_folded"] = (tensors, versions, folded)
        return cached[2]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_folded", None)  # a move or cast may swap a parameter's data in place
        return super()._apply(fn, recurse)

    def set_calibration_scores_(self, scores: torch.Tensor, keep: int = CALIB_SCORES, seed: int = 0) -> None:
        """Keep a seeded random sample of ``keep`` tokens' scores (T, E-1) for the budget -> threshold map."""
        scores = scores.reshape(-1, scores.shape[-1]).detach().float()
        if scores.shape[0] > keep:
            idx = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(seed))[:keep]
            scores = scores[idx]
        self.calib_scores = scores.to(self.fc1.weight.dtype).to(self.calib_scores.device)

    def threshold(self, bits: float) -> float | None:
        """τ for a budget from the fitted grid (linear interpolation), or None if there is no grid."""
        if self.tau.numel() == 0:
            return None
        grid, tau = self.tau_bits.float().cpu(), self.tau.float().cpu()
        i = int(torch.searchsorted(grid, torch.tensor(float(bits))).clamp(1, len(grid) - 1))
        lo, hi = float(grid[i - 1]), float(grid[i])
        w = min(max((bits - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 0.0
        return float(tau[i - 1]) * (1 - w) + float(tau[i]) * w

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in DATA_BUFFERS:  # sizes are data, not architecture
            old = getattr(self, name)
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=old.device))
            elif name in OPTIONAL_BUFFERS:  # a checkpoint from before the cost curves: an empty curve
                setattr(self, name, torch.zeros(0, device="cpu" if old.is_meta else old.device))
                self._non_persistent_buffers_set.add(name)  # not "missing" while this load runs
        try:
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            self._non_persistent_buffers_set.difference_update(OPTIONAL_BUFFERS)
