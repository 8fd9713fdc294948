"""One entry point for both kernels, chosen by token count (gemlite's ``get_matmul_type``)."""

from __future__ import annotations

import torch

from .layout import PackedSlices
from .sliced_gemm import sliced_gemm
from .sliced_gemv import MAX_TOKENS, sliced_gemv, sliced_gemv_ref


def sliced_linear(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor | int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) Ŵ_{k_t}ᵀ (+ bias): decode kernel for <= 16 tokens, prefill kernel above.

    k: an int (all tokens) or an int32 tensor shaped like x[..., 0] on x's device (each token's slice count, 1..E).
    The choice depends only on shapes, never on k's values: no host synchronisation.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    if isinstance(k, int):
        k = torch.full((M,), k, dtype=torch.int32, device=x.device)
    else:
        k = k.reshape(-1).to(device=x.device, dtype=torch.int32)
    y = sliced_gemv(x2, packed, k) if M <= MAX_TOKENS else sliced_gemm(x2, packed, k)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features)


def sliced_linear_ref(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor | int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch twin of ``sliced_linear``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(k, int):
        k = torch.full((x2.shape[0],), k, dtype=torch.int32, device=x.device)
    y = sliced_gemv_ref(x2, packed, k.reshape(-1))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features)
