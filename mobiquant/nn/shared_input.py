"""Routers of linears that read the same input, run as one MLP for a CPU decode token.

In a LLaMA block q_proj, k_proj and v_proj read the same normalised hidden state, and so do gate_proj and up_proj.
Their MoBiRoutes are independent MLPs, but for one decode token on the CPU each costs about the same fixed overhead
(three small torch ops and a host copy), which is most of what routing adds to a step. ``SharedInputRouters`` stacks
the members' fc1 rows and puts their fc2 blocks on a block diagonal:

    h      = silu(x W1ᵀ + b1)          W1 (Σ H_i, K): the members' fc1 (with 1 / input_scale folded in), stacked
    scores = h W2ᵀ + b2                W2 (Σ (E_i - 1), Σ H_i): the members' fc2 on the block diagonal

so the first member called with an input computes every member's scores, and the others read theirs. An input is
recognised by identity (the same tensor object, unmodified since): a member called with any other tensor computes
afresh, so a wrong grouping costs time, never a wrong count. The result is the per-member MLPs' up to fp32 summation
order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # leaf names that share an input


class SharedInputRouters:
    def __init__(self, linears: list):
        self.linears = linears  # MoBiQuantLinears with routers and one in_features
        self._span: dict[int, tuple[int, int]] = {}
        start = 0
        for m in linears:
            self._span[id(m)] = (start, start + m.num_slices - 1)
            start += m.num_slices - 1
        self._parts: tuple | None = None  # the members' folded weights the stacked ones were built from
        self._stacked: tuple[torch.Tensor, ...] = ()
        self._last: tuple | None = None  # (x, x._version, scores as floats) of the last input

    def scores(self, linear, x: torch.Tensor) -> list[float]:
        """``linear``'s router scores for one token x (..., K), as (E-1) floats."""
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version:
            s = token_scores(self._weights(), x)
            last = self._last = (x, x._version, s)  # one tuple: another thread sees the old entry or this one
        i, j = self._span[id(linear)]
        return last[2][i:j]

    def _weights(self) -> tuple[torch.Tensor, ...]:
        parts = tuple(m.router._inference_weights() for m in self.linears)
        if self._parts is None or any(a is not b for a, b in zip(parts, self._parts)):
            w1 = torch.cat([p[0] for p in parts])
            b1 = torch.cat([p[1] for p in parts])
            w2 = torch.block_diag(*[p[2] for p in parts])
            b2 = torch.cat([p[3] for p in parts])
            self._stacked, self._parts = (w1, b1, w2, b2), parts
        return self._stacked


def token_scores(weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> list[float]:
    """One token x (K values, any shape) through a router MLP's folded fp32 weights (w1, b1, w2, b2) -> its scores
    as floats: fc1, SiLU in place, fc2 and the host copy, on a 1-D input, so no reshape of the (1, 1, K) decode input
    and no view of the output (each torch call costs a few µs on a CPU, and a chance to wait for the GIL)."""
    w1, b1, w2, b2 = weights
    h = x.reshape(-1)
    if h.dtype is not torch.float32:
        h = h.float()
    return F.linear(F.silu(F.linear(h, w1, b1), inplace=True), w2, b2).tolist()


def share_router_inputs_(linears: dict) -> list[SharedInputRouters]:
    """Group the routed linears ``{full name: MoBiQuantLinear}`` that share an input (``SIBLINGS`` under one parent
    module) and give each member its group as ``shared_input``; every other linear gets None."""
    groups, by_parent = [], {}
    for name, m in linears.items():
        m.shared_input = None
        parent, _, leaf = name.rpartition(".")
        if m.router is not None:
            by_parent.setdefault(parent, {})[leaf] = m
    for members in by_parent.values():
        for names in SIBLINGS:
            found = [members[n] for n in names if n in members]
            if len(found) > 1 and len({m.in_features for m in found}) == 1:
                group = SharedInputRouters(found)
                for m in found:
                    m.shared_input = group
                groups.append(group)
    return groups
