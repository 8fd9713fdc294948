"""Each routed linear's cost curve: how much the model's loss grows when that linear runs at fewer slices.

    u_{t,e}   = g_tᵀ ΔŴ_e x_t                           e = 2..E: slice e's share of linear output t, seen by the loss
    c_t(k)    = (Σ_{e>k} u_{t,e})²                      = (g_tᵀ (Ŵ_E − Ŵ_k) x_t)², token t at k slices
    c(k)      = mean_t c_t(k)                           k = 1..E, c(E) = 0
    c(k, p)   = mean_t [c_t(k+1) if t is in the top p of the router's scores for slice k+1, else c_t(k)]

x_t is the linear's input and g_t = ∂L/∂y_t the gradient of the next-token loss at its output, with every slice on
(≈ full precision). On text the model sampled itself (the default calibration data) E[g gᵀ] is the Fisher
information, so c/2 is the second-order estimate of the loss increase, dropping the cross terms between linears
and between tokens (the HAWQ / Fisher mixed-precision estimate). c(k, p) prices the router's own ranking: where the
router finds the few tokens that need slice k+1, giving it to a fraction p of the tokens buys most of the gain.

The curve is stored on each router as (bits, cost) points (``fisher_bits``, ``fisher_cost``). The "fisher"
allocation (route.py) spends a budget on the points with the largest loss reduction per weight bit, over the whole
model: sensitive linears get more bits, robust ones fewer, and the router picks the tokens inside a linear whose
allocation falls between two precisions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import MoBiQuantError
from ..nn.linear import MoBiQuantLinear
from ..precision import precision

FRACTIONS = (0.25, 0.5, 0.75)  # router-ranked fractions of tokens priced between two precisions


def fit_fisher_(model: nn.Module, tokens: torch.Tensor, batch_size: int = 2, progress: bool = True) -> nn.Module:
    """Measure every routed linear's cost curve on ``tokens`` (N, L) and store it on its router (module docstring).
    Costs one forward and backward of the model per batch plus E-1 products per linear per token."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, MoBiQuantLinear) and m.router is not None}
    if not linears:
        raise MoBiQuantError("the model has no routed MoBiQuantLinear: calibrate it first")
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise MoBiQuantError(f"tokens must be (samples, length >= 2), got {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    per_token: dict[str, list[torch.Tensor]] = {n: [] for n in linears}  # (T, E-1) u_{t,e} for e = 2..E
    ranks: dict[str, list[torch.Tensor]] = {n: [] for n in linears}  # (T, E-1) router scores

    def hook(name: str, m: MoBiQuantLinear):
        def forward_hook(module, args, out):
            x = args[0].detach()

            def grad_hook(g: torch.Tensor) -> None:
                X, G = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()  # (T, K), (T, N)
                u = [((G @ m.delta(e)) * X).sum(-1) for e in range(2, m.num_slices + 1)]  # ΔŴ_e (N, K) unpacked here
                per_token[name].append(torch.stack(u, -1))  # and freed: a model's worth of deltas is never held
                with torch.no_grad():
                    ranks[name].append(m.router(x).reshape(-1, m.num_slices - 1).float())

            out.register_hook(grad_hook)

        return m.register_forward_hook(forward_hook)

    handles = [hook(n, m) for n, m in linears.items()]
    embed = model.get_input_embeddings()
    E = next(iter(linears.values())).num_slices
    try:
        for i in tqdm(range(0, tokens.shape[0], batch_size), desc="fisher costs", disable=not progress):
            ids = tokens[i : i + batch_size].to(device)
            with torch.enable_grad(), precision(k=E):
                x = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=x).logits[:, :-1].float()
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                torch.autograd.grad(loss, x)  # the hooks see every linear's g; no parameter gradients kept
    finally:
        for h in handles:
            h.remove()
    for n, m in linears.items():
        bits, cost = cost_curve(torch.cat(per_token[n]), torch.cat(ranks[n]), m.precisions)
        m.router.fisher_bits, m.router.fisher_cost = bits.to(m.router.tau.device), cost.to(m.router.tau.device)
    return model


def cost_curve(u: torch.Tensor, scores: torch.Tensor, precisions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E-1) slice shares u_{t,e} and router scores -> (bits, cost) points of c(k) and c(k, p), sorted by bits."""
    E = len(precisions)
    u, scores = u.detach().double().cpu(), scores.detach().float().cpu()  # a host-side summary, wherever u lives
    tail = torch.flip(torch.cumsum(torch.flip(u, [-1]), -1), [-1])  # tail[:, k-1] = Σ_{e>k} u_e, k = 1..E-1
    c_t = torch.cat([tail, torch.zeros_like(tail[:, :1])], -1) ** 2  # (T, E): c_t(k)
    points = [(float(precisions[k]), float(c_t[:, k].mean())) for k in range(E)]
    T = c_t.shape[0]
    for k in range(1, E):  # band (k, k+1): the router's top-p tokens at k+1
        order = torch.argsort(scores[:, k - 1], descending=True)  # residual column k-1 scores slice k+1
        for p in FRACTIONS:
            on = torch.zeros(T, dtype=torch.bool)
            on[order[: round(p * T)]] = True
            c = torch.where(on, c_t[:, k], c_t[:, k - 1]).mean()
            points.append((precisions[k - 1] + p * (precisions[k] - precisions[k - 1]), float(c)))
    points.sort()
    return torch.tensor([b for b, _ in points]), torch.tensor([c for _, c in points], dtype=torch.float32)
