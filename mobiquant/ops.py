"""``torch.library`` custom ops over the Triton kernels: what MoBiQuantLinear and the decode engine call on CUDA.

    y = torch.ops.mobiquant.sliced_linear(x, qweight, scale, zero, k, bias, group_size)   # x (..., K) -> (..., N)
    c = torch.ops.mobiquant.route_counts(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in)

Registered as custom ops with fake (meta) implementations, so ``torch.compile`` traces through them without a graph
break and CUDA graphs capture them like any aten op (house style §1.3–1.4: hqq and gemlite do the same). The real
implementations launch the kernels of ``mobiquant.kernels`` (imported lazily, on the first call: registering the ops
imports neither triton nor initialises CUDA, so ``import mobiquant`` stays light). On a CPU tensor without
``TRITON_INTERPRET=1`` they run the pure-torch references instead, which compute the same functions.

``sliced_linear`` arguments are the tensors of a ``mobiquant.kernels.PackedSlices`` (kernel layout: qweight (E, N, K/16)
int32, scale and zero (G, N) fp16) plus k, each token's slice count (int32, shaped like x[..., 0], values clamped to
1..E by the kernel: no host-side check, so no synchronisation). Kernel constraints (``kernel_compatible``): 2-bit
slices, E <= 4, K % 16 == 0, group size % 32 == 0, x in fp16 or bf16.

``route_counts`` is the fused decode-time router of a group of linears that share one input (q/k/v, gate/up): the
MoBiRoute MLPs, the thresholds and the nested counts in one launch (``mobiquant.kernels.router``).
"""

from __future__ import annotations

import os

import torch

SLICE_BITS = 2
MAX_SLICES = 4


def kernel_compatible(slice_bits, in_features: int, group_size: int) -> bool:
    """Whether a sliced linear of this configuration has a kernel (else the torch path serves it)."""
    return (all(b == SLICE_BITS for b in slice_bits) and 1 <= len(slice_bits) <= MAX_SLICES
            and in_features % 16 == 0 and group_size % 32 == 0)


_HAS_TRITON: bool | None = None


def triton_available() -> bool:
    """True when triton can be imported (checked once, on first use: never at ``import mobiquant``)."""
    global _HAS_TRITON
    if _HAS_TRITON is None:
        try:
            import triton  # noqa: F401

            _HAS_TRITON = True
        except ImportError:
            _HAS_TRITON = False
    return _HAS_TRITON


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    return triton_available() and (x.is_cuda or _interpret())


# ------------------------------------------------------------------------------------------------ sliced_linear
@torch.library.custom_op("mobiquant::sliced_linear", mutates_args=())
def sliced_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: torch.Tensor,
                  bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """y (..., N) = x (..., K) Ŵ_{k_t}ᵀ (+ bias), Ŵ_k from the first k slices in the kernels' layout."""
    from mobiquant.kernels.layout import PackedSlices

    packed = PackedSlices(qweight, scale, zero, group_size)
    k = k.to(torch.int32)
    if _use_triton(x):
        from mobiquant.kernels.dispatch import sliced_linear as launch

        return launch(x, packed, k, bias)
    return sliced_linear_ref(x, packed, k, bias)


@sliced_linear.register_fake
def _(x, qweight, scale, zero, k, bias, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


def sliced_linear_ref(x: torch.Tensor, packed, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch (no triton): y_t = x_t Ŵ_{k_t}ᵀ in fp32, cast to x's dtype, one dense Ŵ_k per k present."""
    from mobiquant.kernels.layout import dense_weight

    x2 = x.reshape(-1, x.shape[-1])
    kk = k.reshape(-1).long().clamp(1, packed.num_slices).to(x.device)
    y = torch.zeros(x2.shape[0], packed.out_features, dtype=torch.float32, device=x.device)
    for kv in range(1, packed.num_slices + 1):
        y = torch.where((kk == kv)[:, None], x2.float() @ dense_weight(packed, kv).t(), y)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.out_features)


# ------------------------------------------------------------------------------------------------ route_counts
@torch.library.custom_op("mobiquant::route_counts", mutates_args=())
def route_counts(x: torch.Tensor, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
                 given: torch.Tensor, counts_in: torch.Tensor) -> torch.Tensor:
    """Slice counts (R,) int32 of one token for R routers sharing the input x (K,).

    s (R, K) the routers' input scales, w1 (R, H, K) fc1 weights, b1 (R, H), w2 (R, E-1, H), b2 (R, E-1) (any float
    dtype; the arithmetic is fp32, as in MoBiRoute.forward),
    tau (R,) fp32 thresholds, force_on / force_off (E-1,) bool (the band allocation: residual slices always on / off),
    given (R,) bool and counts_in (R,) int32: where given, the count is counts_in (uniform and random modes).
    """
    if _use_triton(x):
        from mobiquant.kernels.router import route_counts as launch

        return launch(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in)
    return route_counts_ref(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in)


@route_counts.register_fake
def _(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in):
    return counts_in.new_empty(w1.shape[0], dtype=torch.int32)


def router_scores(x: torch.Tensor, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor) -> torch.Tensor:
    """(T, K) -> (T, R, E-1) fp32 scores of R MoBiRoute MLPs on one input: fc2(silu(fc1(x / s_r)))."""
    h = torch.einsum("trk,rhk->trh", x.float()[:, None, :] / s.float(), w1.float()) + b1.float()
    return torch.einsum("trh,reh->tre", torch.nn.functional.silu(h), w2.float()) + b2.float()


def counts_from_scores(scores, tau, force_on, force_off, given, counts_in):
    """(T, R, E-1) scores -> (T, R) int32 nested counts; band forcing and given counts applied (device-only ops)."""
    s = torch.where(force_on, float("inf"), torch.where(force_off, float("-inf"), scores))
    on = (s > tau[:, None].float()).to(torch.int32)
    counts = 1 + torch.cumprod(on, dim=-1).sum(-1).to(torch.int32)
    return torch.where(given, counts_in.to(torch.int32), counts)


def route_counts_ref(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in):
    """Pure torch twin of ``route_counts`` (one token)."""
    scores = router_scores(x.reshape(1, -1), s, w1, b1, w2, b2)
    return counts_from_scores(scores, tau, force_on, force_off, given, counts_in)[0]


__all__ = ["sliced_linear", "sliced_linear_ref", "route_counts", "route_counts_ref", "router_scores",
           "counts_from_scores", "kernel_compatible", "triton_available"]
