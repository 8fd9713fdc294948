"""One entry point for the kernels, chosen by token count and dtype (gemlite's ``get_matmul_type``).

    1 token, fp16      sliced_gemv_cc (v7 + v8): fastest at batch 1 on the H100 (fewest instructions per weight)
    2..16, fp16, g128  sliced_gemv_mma (v9, one plane at a time for all tokens): at 4 tokens 1.5x faster than v5 at
                       k = 2, and a mixed batch costs what uniform k_max costs (v5: 2.1x; KERNEL_NOTES.md, "v9")
    <= 16 tokens       sliced_gemv (v5, tensor cores through shared memory): bf16, other group sizes
    more               sliced_gemm (prefill)

``sliced_linear_multi`` runs the weights of one input (q/k/v, gate/up), each at its own slice counts: one v7 launch
for one fp16 token (the decode engine's step), else one ``sliced_linear`` per weight.
"""

from __future__ import annotations

import torch

from .layout import PackedSlices
from .sliced_gemm import sliced_gemm
from .sliced_gemv import MAX_TOKENS, sliced_gemv, sliced_gemv_ref
from .sliced_gemv_cc import sliced_gemv_cc
from .sliced_gemv_mma import GROUP_MMA, MAX_TOKENS_MMA, sliced_gemv_mma

CC_MAX_TOKENS = 1  # v7 only where it measured faster (batch 1); its kernel takes up to 4 tokens


def sliced_linear(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor | int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) Ŵ_{k_t}ᵀ (+ bias): v7 + v8 for one fp16 token, v9 for 2..16 fp16 tokens (groups of
    128), v5 for other decode batches, the prefill kernel above 16 tokens.

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
    if M <= CC_MAX_TOKENS and x2.dtype == torch.float16:
        y = sliced_gemv_cc(x2, packed, k)
    elif M <= MAX_TOKENS_MMA and x2.dtype == torch.float16 and packed.group_size == GROUP_MMA:
        y = sliced_gemv_mma(x2, packed, k)
    elif M <= MAX_TOKENS:
        y = sliced_gemv(x2, packed, k)
    else:
        y = sliced_gemm(x2, packed, k)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features)


def sliced_linear_multi(x: torch.Tensor, packs: list[PackedSlices], k: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N_1 + N_2 + ...) = [x Ŵ_1ᵀ, x Ŵ_2ᵀ, ...] (+ bias): weights of one input (q/k/v, gate/up), weight s at
    the counts k[..., s] (k shaped like x[..., 0] plus one column per weight). One v7 launch for one fp16 token,
    else one ``sliced_linear`` per weight."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    k2 = k.reshape(x2.shape[0], len(packs)).to(device=x.device, dtype=torch.int32)
    if x2.shape[0] <= CC_MAX_TOKENS and x2.dtype == torch.float16:
        y = sliced_gemv_cc(x2, packs, k2)
    else:
        y = torch.cat([sliced_linear(x2, p, k2[:, s].contiguous()) for s, p in enumerate(packs)], dim=-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])


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
