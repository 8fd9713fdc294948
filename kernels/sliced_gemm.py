"""Prefill kernel: y = x Ŵ_{k_t}ᵀ for many tokens, tokens grouped by slice count (token permutation, paper §4.3).

Shapes: x (M, K) fp16/bf16, any M; k (M,) int32 on the device; packed: PackedSlices with N rows; y (M, N).

Blocked algorithm:

    perm = stable argsort(k)             # on the device: tokens of equal k become contiguous segments
    grid = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), m-tiles fastest (consecutive programs share a weight tile in L2)
    for each program (m-tile of the *sorted* tokens, n-tile):
        rows = perm[m-tile]; kmin, kmax = min/max k of the rows
        for g in groups:                                               # _tile.group_loop_dq
            Ŵ = s_k (Q_kmax + 1/2) - z_1 s_1   (BLOCK_N, g) in fp16/bf16, from the merged planes (fp32 math)
            acc = dot(Ŵ, x[rows, g]ᵀ, acc)     # chained: the tensor cores run asynchronously
        (a tile that straddles two segments, at most E - 1 of them, runs one dot per slice with masked x instead)
        y[rows, n-tile] = acc                                          # scattered back through perm

So each slice's plane is read, and each slice's GEMM is run, only by the m-tiles whose tokens use it: a segment at
k slices costs the tensor-core work of one fp16 GEMM plus the unpacking of k planes per weight tile.
The pure-torch ``sliced_gemm_ref`` computes the same function from the dense Ŵ_k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tile
from .layout import PackedSlices
from .sliced_gemv import _check_args, _dt, _interpret, sliced_gemv_ref
from .tuning import lookup


def _autotune_configs():
    out = []
    for bm in (64, 128):
        for bn in (64, 128):
            for nw in (4, 8):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=3))
    return out


def default_config(M: int, N: int, K: int, group_size: int) -> dict:
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


@triton.jit
def _sliced_gemm_kernel(
    x_ptr, y_ptr, k_ptr, perm_ptr, w_ptr, s_ptr, z_ptr,
    M, N, G, stride_xm, stride_ym, plane_stride,
    E: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    DT: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    WPG: tl.constexpr = GROUP // 16
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0)  # original token index of each sorted position
    kt = tl.minimum(tl.maximum(tl.load(k_ptr + rows, mask=m_mask, other=1), 1), E)
    kmax = tl.max(tl.where(m_mask, kt, 1), axis=0)
    kmin = tl.minimum(tl.min(tl.where(m_mask, kt, E), axis=0), kmax)
    K_words = G * WPG
    w_ptrs = w_ptr + offs_n[:, None] * K_words + tl.arange(0, WPG)[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # (BM, GROUP) gathered rows
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc = _tile.tile_acc_dq(acc, w_ptrs, n_mask[:, None], plane_stride, x_ptrs, m_mask[:, None],
                            s_ptr + offs_n, z_ptr + offs_n, n_mask, kt, kmin, kmax, G, N, E, GROUP, DT, USE_ASM)
    y_ptrs = y_ptr + rows[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(DT), mask=n_mask[:, None] & m_mask[None, :])


def sliced_gemm(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor, out: torch.Tensor | None = None,
                config: dict | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · Ŵ_{k_t}ᵀ per token t, any M. k: (M,) int32 on x's device. No host sync."""
    x, M, N, K = _check_args(x, packed, k)
    dt = _dt(x.dtype)
    use_asm = (not _interpret()) if use_asm is None else use_asm
    cfg = config or lookup("sliced_gemm", M, N, K) or default_config(M, N, K, packed.group_size)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    g = packed.group_size
    G = K // g
    perm = torch.argsort(k, stable=True).to(torch.int32)  # token permutation by slice count
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _sliced_gemm_kernel[grid](
        x, y, k, perm, packed.qweight, packed.scale, packed.zero,
        M, N, G, x.stride(0), y.stride(0), packed.qweight[0].numel(),
        E=packed.num_slices, GROUP=g, BLOCK_N=BN, BLOCK_M=BM, DT=dt, USE_ASM=use_asm,
        num_warps=cfg.get("num_warps", 8), num_stages=cfg.get("num_stages", 3),
    )
    return y


def sliced_gemm_ref(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor) -> torch.Tensor:
    """Pure torch reference (same function as the decode reference)."""
    return sliced_gemv_ref(x, packed, k)


__all__ = ["sliced_gemm", "sliced_gemm_ref", "default_config"]
