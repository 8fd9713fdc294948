"""Outlier migration (paper §3): the tokens that a linear quantizes worst change with the precision.

For one quantized linear and a text:

    x_t         the linear's input for token t, captured in one pass at the model's top precision (so every
                precision below is compared on the same inputs, as in paper-notes §3.4)
    e_t^(k)     = ||x_t (Ŵ_k - W)ᵀ||²   per-token output error against the full-precision weight W, k = 1..E
    e_t^(b)     the same with the router's per-token slice counts at budget b ("routed")
    S^(k)       the top-10 % tokens by e^(k);   overlap = Jaccard |S^(i) ∩ S^(j)| / |S^(i) ∪ S^(j)|
    absmax_t    max_i |x_t,i|, the activation outlier view

Low overlap between precisions is the claim: calibrating for one precision protects the wrong tokens at another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MoBiQuantError
from .nn.linear import MoBiQuantLinear
from .precision import precision


@dataclass
class MigrationReport:
    linear: str
    token_ids: list[int]
    absmax: torch.Tensor  # (T,)
    errors: dict[str, torch.Tensor]  # label ("2 bits", ..., "routed 4 bits") -> (T,) error
    top: dict[str, torch.Tensor]  # label -> indices of the top tokens
    jaccard: torch.Tensor  # (P, P) over the labels, in order
    labels: list[str]
    counts: dict[str, torch.Tensor]  # routed label -> (T,) slice counts

    def table(self) -> str:
        """The Jaccard matrix as text."""
        w = max(len(s) for s in self.labels)
        lines = [" " * w + " " + " ".join(f"{s:>{w}}" for s in self.labels)]
        for s, row in zip(self.labels, self.jaccard.tolist()):
            lines.append(f"{s:>{w}} " + " ".join(f"{v:>{w}.2f}" for v in row))
        return "\n".join(lines)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


@torch.no_grad()
def outlier_migration(model, linear: str, input_ids: torch.Tensor, fp_weight: torch.Tensor,
                      budgets: tuple[float, ...] = (), top_frac: float = 0.1) -> MigrationReport:
    """Per-token errors of ``linear`` at every precision (and routed budgets); see the module docstring."""
    try:
        layer = model.get_submodule(linear)
    except AttributeError:
        layer = None
    if not isinstance(layer, MoBiQuantLinear):
        raise MoBiQuantError(f"{linear!r} is not a quantized linear of this model")
    if fp_weight.shape != (layer.out_features, layer.in_features):
        raise MoBiQuantError(f"fp_weight has shape {tuple(fp_weight.shape)}, the layer is "
                             f"{(layer.out_features, layer.in_features)}")
    if not 0 < top_frac <= 1:
        raise MoBiQuantError(f"top_frac must be in (0, 1], got {top_frac}")
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    try:
        with precision(k=layer.num_slices):
            model(input_ids=input_ids.reshape(1, -1).to(next(model.parameters()).device))
    finally:
        handle.remove()
    x = captured["x"].reshape(-1, layer.in_features).float()  # (T, K)
    W = fp_weight.float().to(x.device)
    errors, counts = {}, {}
    per_k = []
    for k in range(1, layer.num_slices + 1):
        e = (x @ (layer.weight_k(k).to(x.device) - W).T).pow(2).sum(-1)  # (T,)
        per_k.append(e)
        errors[f"{layer.precisions[k - 1]} bits"] = e
    stacked = torch.stack(per_k)  # (E, T)
    for b in budgets:
        n = layer.route(x, b)  # (T,)
        counts[f"routed {b:g} bits"] = n
        errors[f"routed {b:g} bits"] = stacked.gather(0, (n - 1)[None])[0]
    labels = list(errors)
    top_n = max(1, round(top_frac * x.shape[0]))
    top = {s: errors[s].topk(top_n).indices for s in labels}
    jac = torch.tensor([[_jaccard(top[a], top[b]) for b in labels] for a in labels])
    return MigrationReport(linear, input_ids.reshape(-1).tolist(), x.abs().amax(-1).cpu(),
                           {s: e.cpu() for s, e in errors.items()}, top, jac, labels, counts)
