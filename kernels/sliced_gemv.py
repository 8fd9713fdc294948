"""Decode kernel: y = x Ŵ_{k_t}ᵀ for 1..16 tokens, each token at its own slice count k_t read from the device.

Shapes: x (M, K) fp16/bf16 with M <= 16; k (M,) int32 on the device (1..E, clamped); packed: PackedSlices
(layout.py) with N rows; y (M, N) in x's dtype. No host synchronisation: k never leaves the GPU, so the launcher can
run inside a CUDA graph and a new budget needs no recapture.

Blocked algorithm (tokens padded to BLOCK_M = 16 so the product runs on tensor cores; the padded columns cost
tensor-core time, which is idle in a memory-bound GEMV anyway):

    grid = (cdiv(N, BLOCK_N), SPLIT_K)                       # split-K fills the SMs for small N or long K
    for each program (n-tile, split s):
        kmin, kmax = min/max of k over the real tokens        # the tile reads planes 1..kmax and no other
        acc (BLOCK_N, 16) fp32 = 0
        for g in groups of split s:                           # _tile.group_loop
            load kmax int32 word tiles (BLOCK_N, g/16), merge them into BIAS + Q_kmax (inline PTX), dot with x_gᵀ
            (or, if kmin < kmax, one dot per slice over the tokens that use it), scale once per group and row
        if SPLIT_K == 1: y[:, n-tile] = acc
        else: store acc to a workspace; the last split to arrive (an acq_rel counter per n-tile, reset by it)
              adds the SPLIT_K partials and writes y                 # one launch, no memset, no second kernel

The pure-torch ``sliced_gemv_ref`` computes the same function from the dense Ŵ_k (layout.dense_weight).

CUDA graphs: the split-K workspace and counters are allocated on a device's first call (and grown when a larger
shape needs more); call once per shape before capturing, as any warm-up does. Status on the H100: correct, but at
18-52 % of copy bandwidth at batch 1, latency-bound in the per-group wgmma chain (benchmarks/KERNEL_NOTES.md). One
fp16 token goes to the CUDA-core kernel v7 instead (sliced_gemv_cc.py, via dispatch.sliced_linear).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _tile
from .layout import PackedSlices, dense_weight
from .tuning import lookup

MAX_TOKENS = 16
BLOCK_M = 16


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_configs():
    """The grid a tuning run sweeps (benchmarks/kernels.py --tune); winners are saved in configs/<gpu>.json."""
    out = [dict(BLOCK_N=64, SPLIT_K=sk, num_warps=4, num_stages=3, GPI=0, XS=1) for sk in (1, 2, 4, 8, 16)]
    out += [dict(BLOCK_N=64, SPLIT_K=sk, num_warps=4, num_stages=1, GPI=1, XS=1) for sk in (1, 4)]
    return out


def default_config(M: int, N: int, K: int, group_size: int) -> dict:
    """Heuristic when no tuned config exists (fits the H100 sweeps in KERNEL_NOTES.md): >= 256 programs, split-K
    only as far as needed for that, each split >= 2 groups. More splits cost more than they gain (v4 sweep)."""
    bn = 64  # 128 rows spill registers at 4 warps (v2 notes)
    tiles = triton.cdiv(N, bn)
    G = K // group_size
    sk = 1
    while tiles * sk < 256 and G // (2 * sk) >= 2:
        sk *= 2
    return dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=4, num_stages=3, GPI=0, XS=1)


@triton.jit
def _sliced_gemv_kernel(
    x_ptr, y_ptr, k_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, cnt_ptr,
    M, N, G, stride_xm, stride_ym, plane_stride,
    E: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
    DT: tl.constexpr, USE_ASM: tl.constexpr, GPI: tl.constexpr, XS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPG: tl.constexpr = GROUP // 16
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # slice counts of the real tokens, clamped to 1..E; padded tokens do not widen the tile
    kt = tl.minimum(tl.maximum(tl.load(k_ptr + offs_m, mask=m_mask, other=1), 1), E)
    kmax = tl.max(tl.where(m_mask, kt, 1), axis=0)
    kmin = tl.min(tl.where(m_mask, kt, E), axis=0)
    kmin = tl.minimum(kmin, kmax)  # a tile of one k: kmin == kmax
    # groups of this split
    gps = tl.cdiv(G, SPLIT_K)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, G)
    w_ptrs = w_ptr + offs_n[:, None] * WPG + tl.arange(0, WPG)[None, :]  # (BN, WPG) plane 1, group 0 (group-major)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # (BM, GROUP)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc = _tile.tile_acc(acc, w_ptrs, n_mask[:, None], plane_stride, x_ptrs, m_mask[:, None], x_ptr,
                         s_ptr + offs_n, z_ptr + offs_n, n_mask, kt, kmin, kmax, g_lo, g_hi, N, 0,
                         E, GROUP, DT, USE_ASM, XS, GPI)
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    y_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(DT), mask=y_mask)
    else:
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]
        ws = ws_ptr + pid_n * (SPLIT_K * BLOCK_N * BLOCK_M)
        ws_mask = (offs_m < M)[None, :]  # only the real tokens' columns travel
        tl.store(ws + pid_k * (BLOCK_N * BLOCK_M) + tile, acc, mask=ws_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter is released
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last split of this n-tile: reduce and reset the counter
            tot = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for s in range(SPLIT_K):
                tot += tl.load(ws + s * (BLOCK_N * BLOCK_M) + tile, mask=ws_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, tot.to(DT), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


_WORKSPACE: dict = {}


def _scratch(device, n_ws: int, n_cnt: int, store: dict = _WORKSPACE) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K workspace (fp32) and self-resetting counters (int32, zero between launches), cached per device in
    ``store`` (the linears share ``_WORKSPACE``; the router keeps its own).

    Grows only; allocate once before graph capture (a first call does it) so a captured graph never allocates.
    """
    key = (device.type, device.index)
    ws, cnt = store.get(key, (None, None))
    if ws is None or ws.numel() < n_ws:
        ws = torch.empty(max(n_ws, 1 << 20), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 4096), dtype=torch.int32, device=device)
    store[key] = (ws, cnt)
    return ws, cnt


def _dt(dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.bfloat16
    raise TypeError(f"x must be fp16 or bf16, got {dtype}")


def _check_args(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor):
    """The launchers' shared contract: x (M >= 1, K) with unit stride along K, k (M,) int32 on x's device.
    Returns (x, M, N, K)."""
    M, K = x.shape
    if M < 1:
        raise ValueError("x has no tokens")
    if K != packed.in_features:
        raise ValueError(f"x has {K} features, the weight {packed.in_features}")
    if k.shape != (M,) or k.dtype != torch.int32 or k.device != x.device:
        raise ValueError("k must be an int32 tensor of shape (M,) on x's device")
    return (x if x.stride(1) == 1 else x.contiguous()), M, packed.out_features, K


def sliced_gemv(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor, out: torch.Tensor | None = None,
                config: dict | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · Ŵ_{k_t}ᵀ per token t, for M <= 16 tokens. k: (M,) int32 on x's device.

    ``config`` (BLOCK_N, SPLIT_K, num_warps, num_stages) overrides the tuned one; ``use_asm`` the PTX unpacking
    (default: on unless TRITON_INTERPRET=1). ``out`` may be given (M, N) contiguous, e.g. for graph capture.
    """
    x, M, N, K = _check_args(x, packed, k)
    if M > MAX_TOKENS:
        raise ValueError(f"sliced_gemv takes 1..{MAX_TOKENS} tokens, got {M} (use sliced_gemm)")
    dt = _dt(x.dtype)
    use_asm = (not _interpret()) if use_asm is None else use_asm
    cfg = config or lookup("sliced_gemv", M, N, K) or default_config(M, N, K, packed.group_size)
    BN, SK = cfg["BLOCK_N"], cfg["SPLIT_K"]
    G = K // packed.group_size
    SK = split_count(G, SK)
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    n_tiles = triton.cdiv(N, BN)
    ws, cnt = _scratch(x.device, n_tiles * SK * BN * BLOCK_M if SK > 1 else 1, n_tiles)
    _sliced_gemv_kernel[(n_tiles, SK)](
        x, y, k, packed.qweight, packed.scale, packed.zero, ws, cnt,
        M, N, G, x.stride(0), y.stride(0), packed.qweight[0].numel(),
        E=packed.num_slices, GROUP=packed.group_size, BLOCK_N=BN, BLOCK_M=BLOCK_M, SPLIT_K=SK, DT=dt,
        USE_ASM=use_asm, GPI=cfg.get("GPI", 0), XS=cfg.get("XS", 1), num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3), **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
    )
    return y


def fill_split_k(programs: int, G: int, target: int = 448) -> int:
    """The decode kernels' default split-K: doubled until ``programs`` x split-K reaches ``target`` (about 3 waves
    of 132 SMs), keeping at least 2 groups per split."""
    sk = 1
    while programs * sk < target and G // (2 * sk) >= 2:
        sk *= 2
    return sk


def split_count(G: int, split_k: int) -> int:
    """The split-K actually launched for G groups: at most ``split_k``, and every split gets at least one group.

    The kernels give split p the groups [p gps, min((p + 1) gps, G)) with gps = cdiv(G, SPLIT_K), so a split count
    with (SPLIT_K - 1) gps >= G leaves the last splits empty (G = 112, SPLIT_K = 32: gps = 4, splits 28..31). Those
    programs add nothing and, in v7, asked for an L2 prefetch of a negative size (read as ~4 GB): down_proj at
    split-K 32 took 0.3-0.5 ms instead of ~13 us (KERNEL_NOTES.md, "eighth session")."""
    sk = max(1, min(split_k, G))
    while sk > 1 and (sk - 1) * triton.cdiv(G, sk) >= G:
        sk -= 1
    return sk


def sliced_gemv_ref(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor) -> torch.Tensor:
    """Pure torch: y_t = x_t Ŵ_{k_t}ᵀ in fp32, cast to x's dtype (one dense Ŵ_k per k present)."""
    kk = k.clamp(1, packed.num_slices).long()
    y = torch.empty(x.shape[0], packed.out_features, dtype=torch.float32, device=x.device)
    for kv in range(1, packed.num_slices + 1):
        idx = (kk == kv).nonzero().squeeze(1)
        if idx.numel():
            y[idx] = x[idx].float() @ dense_weight(packed, kv).t()
    return y.to(x.dtype)


__all__ = ["sliced_gemv", "sliced_gemv_ref", "default_config", "split_count", "MAX_TOKENS"]
