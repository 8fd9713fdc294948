"""The routed mixture of one linear during stage 2, with E + 2 matmuls per step instead of 3E.

    y_t = x_t Ŵ_1ᵀ + Σ_{e ≥ 2} m_{t,e} x_t ΔŴ_eᵀ,        ΔŴ_e = Ŵ_e - Ŵ_{e-1}

With hard nested masks (the STE's forward value) this is y_t = x_t Ŵ_{n_t}ᵀ, n_t = 1 + Σ_e m_{t,e}: one matmul
over the tokens grouped by n_t. The backward needs, for every level k, G_k = g Ŵ_k (M, K):

    dL/dx_t     = G_{n_t}[t]
    dL/dm_{t,e} = <g_t, x_t ΔŴ_eᵀ> = <G_e[t] - G_{e-1}[t], x_t>     (the router's gradient, through the STE)
    dL/dŴ_k     = Σ_{t: n_t = k} g_tᵀ x_t                          (the clipping's gradient)

The plain form (one matmul per slice forward, two per slice backward) costs 3E matmuls of the same size; this one
costs 1 + E + 1. Same values up to the order of float sums (tests/calibrate/test_mixture.py).
"""

from __future__ import annotations

import torch


class RoutedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, *W: torch.Tensor) -> torch.Tensor:
        # x (M, K); m (M, E-1) nested 0/1 masks; W: E tensors Ŵ_1..Ŵ_E (N, K)  ->  y (M, N)
        n = m.detach().round().long().sum(-1)  # (M,) slice count - 1
        groups = [torch.nonzero(n == k).squeeze(1) for k in range(len(W))]
        y = x.new_empty(x.shape[0], W[0].shape[0])
        for k, idx in enumerate(groups):
            if idx.numel():
                y[idx] = x[idx] @ W[k].T
        ctx.save_for_backward(x, *W)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, *W = ctx.saved_tensors
        groups = ctx.groups
        need_x, need_m, *need_w = ctx.needs_input_grad
        G = [g @ Wk for Wk in W] if (need_x or need_m) else []  # E x (M, K)
        dx = dm = None
        if need_x:
            dx = torch.empty_like(x)
            for k, idx in enumerate(groups):
                dx[idx] = G[k][idx]
        if need_m:
            dm = torch.stack([((G[e] - G[e - 1]) * x).sum(-1) for e in range(1, len(W))], dim=-1)  # (M, E-1)
        dW = [g[idx].T @ x[idx] if need else None for need, idx in zip(need_w, groups)]  # empty group: zeros
        return dx, dm, *dW


def routed_mixture(x: torch.Tensor, m: torch.Tensor, W: list[torch.Tensor]) -> torch.Tensor:
    """x (..., K), m (..., E-1) hard nested masks (values 0/1, any gradient), W = [Ŵ_1..Ŵ_E] (N, K) -> (..., N)."""
    lead = x.shape[:-1]
    y = RoutedMixture.apply(x.reshape(-1, x.shape[-1]), m.reshape(-1, m.shape[-1]), *W)
    return y.reshape(*lead, y.shape[-1])
