"""Prefill kernel: y = x Ŵ_{k_t}ᵀ for many tokens, tokens grouped by slice count (token permutation, paper §4.3).

Shapes: x (M, K) fp16/bf16, any M; k (M,) int32 on the device; packed: PackedSlices with N rows; y (M, N).

Blocked algorithm:

    perm = stable argsort(k)             # on the device: tokens of equal k become contiguous segments
    b_e  = searchsorted(sorted k, e + 1)  # on the device (no host sync): where the segment at e + 1 slices starts
    m-tiles: each segment is tiled on its own (cdiv(c_e, BLOCK_M) tiles), so every tile is uniform;
    grid = (cdiv(M, BLOCK_M) + E - 1) m-tile slots * cdiv(N, BLOCK_N), m fastest (consecutive programs share a
           weight tile in L2), the E - 1 extra slots of every n-tile last; slots past the last segment's tiles
           return at once
    for each program (m-tile of one segment, at k slices; n-tile):
        rows = perm[its positions]
        for g in groups:                                               # _tile.group_loop_dq
            Ŵ = s_k (Q_k + 1/2) - z_1 s_1   (BLOCK_N, g) in fp16/bf16, from the merged planes (fp32 math)
            acc = dot(Ŵ, x[rows, g]ᵀ, acc)     # chained: the tensor cores run asynchronously
        y[rows, n-tile] = acc                                          # scattered back through perm

So each slice's plane is read, and each slice's GEMM is run, only by the m-tiles whose tokens use it: a segment at
k slices costs the tensor-core work of one fp16 GEMM plus the unpacking of k planes per weight tile. Tiling the
segments separately costs at most E - 1 partly filled tiles; before, a tile that straddled two segments ran one dot
per slice with masked x, and those few tiles, up to 4x slower than the others, set the kernel's time
(benchmarks/KERNEL_NOTES.md, "prefill v6").
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
    x_ptr, y_ptr, perm_ptr, bnd_ptr, w_ptr, s_ptr, z_ptr,
    M, N, G, stride_xm, stride_ym, plane_stride,
    E: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    DT: tl.constexpr, USE_ASM: tl.constexpr,
):
    """perm_ptr: (M,) the tokens sorted by slice count; bnd_ptr: (E - 1,) where the tokens at 2..E slices start in
    it (k outside 1..E counts as the nearest end)."""
    pid = tl.program_id(0)
    # m-tile slots: cdiv(M, BLOCK_M), m fastest, then E - 1 more per n-tile (each segment starts a new tile, so a
    # segment's last tile may be partly filled), launched last: most of them have no tokens and return at once
    num_m0 = tl.cdiv(M, BLOCK_M)
    main = num_m0 * tl.cdiv(N, BLOCK_N)
    pid_m = pid % num_m0
    pid_n = pid // num_m0
    if E > 1:
        if pid >= main:
            pid_m = num_m0 + (pid - main) % (E - 1)
            pid_n = (pid - main) // (E - 1)
    # which segment this m-tile belongs to: its first sorted position, the segment's end and slice count
    pos0 = -1
    pos_end = 0
    kseg = 1
    seg_start = 0
    tile_start = 0
    for e in tl.static_range(E):
        if e + 1 < E:
            seg_end = tl.load(bnd_ptr + e).to(tl.int32)
        else:
            seg_end = M
        c = seg_end - seg_start
        t = tl.cdiv(c, BLOCK_M)
        inside = (pid_m >= tile_start) & (pid_m < tile_start + t)
        pos0 = tl.where(inside, seg_start + (pid_m - tile_start) * BLOCK_M, pos0)
        pos_end = tl.where(inside, seg_start + c, pos_end)
        kseg = tl.where(inside, e + 1, kseg)
        seg_start = seg_end
        tile_start += t
    if pos0 >= 0:
        WPG: tl.constexpr = GROUP // 16
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pos0 + tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < pos_end
        rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int32)  # original index of each sorted position
        w_ptrs = w_ptr + offs_n[:, None] * WPG + tl.arange(0, WPG)[None, :]  # plane 1, group 0 (group-major)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # (BM, GROUP) gathered rows
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc = _tile.tile_acc_dq(acc, w_ptrs, n_mask[:, None], plane_stride, x_ptrs, m_mask[:, None],
                                s_ptr + offs_n, z_ptr + offs_n, n_mask, kseg, G, N, E, GROUP, DT, USE_ASM)
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
    E, g = packed.num_slices, packed.group_size
    G = K // g
    ks, perm = torch.sort(k, stable=True)  # token permutation by slice count
    bnd = torch.searchsorted(ks, torch.arange(2, E + 1, dtype=ks.dtype, device=ks.device))  # (E - 1,) no host sync
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = ((triton.cdiv(M, BM) + E - 1) * triton.cdiv(N, BN),)
    _sliced_gemm_kernel[grid](
        x, y, perm, bnd, packed.qweight, packed.scale, packed.zero,
        M, N, G, x.stride(0), y.stride(0), packed.qweight[0].numel(),
        E=E, GROUP=g, BLOCK_N=BN, BLOCK_M=BM, DT=dt, USE_ASM=use_asm,
        num_warps=cfg.get("num_warps", 8), num_stages=cfg.get("num_stages", 3),
    )
    return y


def sliced_gemm_ref(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor) -> torch.Tensor:
    """Pure torch reference (same function as the decode reference)."""
    return sliced_gemv_ref(x, packed, k)


__all__ = ["sliced_gemm", "sliced_gemm_ref", "default_config"]
