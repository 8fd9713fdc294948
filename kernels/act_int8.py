"""Per-group int8 activations for the int8 tensor-core decode path (``sliced_gemv_cc(..., x_int8=...)``).

An option, not the default: it changes the numerics (x is rounded to 8 bits per group of the weights' group size;
the weights are exact as before). What it buys: the 2-bit codes go to mma.sync m16n8k32 (u8 x s8 -> s32) as bytes,
one AND per four weights at k = 1, instead of the fp16 conversion (LOP3 + HFMA2 per two weights) of v8.

Per token m and group gi of g in-features (g = 128):

    sx[m, gi] = max |x| / 127          xq = floor(x / sx + 1/2), clamped to [-127, 127] (int8)
    SX[m, gi] = Σ xq over the group    (exact integer, stored as fp32: the zero point's term, s_k z_k sx SX)

Byte order of xq (M, K) int8, read as (M, K/4) int32: the word of 16 in-features at 16 c (chunk c) keeps its bytes
in the order of the weight words' bit slots (layout.SLOT): int32 word j of the chunk holds, in byte b, the activation
of slot 4 b + j, which is the byte the kernel's ``w >> 2 j & 0x03030303`` (k = 1, and the same per slot at every k)
puts the code of in. So an mma's A (codes) and B (activations) registers pair the same in-features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import CODES_PER_WORD, SLOT

QMAX = 127
_TINY = 1e-30  # an all-zero group: sx = 1e-30 / 127, xq = 0
_QMAX_F = tl.constexpr(float(QMAX))  # the same two, as the kernel can read them
_TINY_F = tl.constexpr(_TINY)

# XPERM[d] = position (0..15 in the chunk) whose activation goes to byte d = 4 j + b of the chunk: slot 4 b + j
_POS_OF_SLOT = {s: p for p, s in enumerate(SLOT)}
XPERM = [_POS_OF_SLOT[4 * (d % 4) + d // 4] for d in range(CODES_PER_WORD)]
XDEST = [XPERM.index(p) for p in range(CODES_PER_WORD)]  # the inverse: byte of position p


def _check(x: torch.Tensor, group_size: int) -> tuple[int, int]:
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be (M, K) fp16 / bf16 / fp32, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    if group_size < CODES_PER_WORD or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"K={K} must be a multiple of the group size {group_size} (a power of 2, at least 16)")
    return M, K


def quantize_x_int8_ref(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``quantize_x_int8``: (xq (M, K/4) int32 in the kernel's byte order, xs (M, G, 2) fp32
    = (sx, SX) per group)."""
    M, K = _check(x, group_size)
    xg = x.float().reshape(M, K // group_size, group_size)
    amax = xg.abs().amax(-1, keepdim=True).clamp_min(_TINY)  # (M, G, 1)
    q = torch.floor(xg * (QMAX / amax) + 0.5).clamp(-QMAX, QMAX)  # (M, G, g)
    xs = torch.cat([amax / QMAX, q.sum(-1, keepdim=True)], -1)  # (M, G, 2)
    perm = torch.tensor(XPERM, device=x.device)
    xq = q.reshape(M, K // CODES_PER_WORD, CODES_PER_WORD)[..., perm].to(torch.int8).reshape(M, K)
    return xq.view(torch.int32), xs.contiguous()


def dequantize_x_int8(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 = sx xq in the in-features' own order: what the int8 path multiplies the weights with."""
    M = xq.shape[0]
    G = xs.shape[1]
    q = xq.contiguous().view(torch.int8).float()  # (M, K)
    K = q.shape[1]
    q = q.reshape(M, K // CODES_PER_WORD, CODES_PER_WORD)[..., torch.tensor(XDEST, device=q.device)]
    return (q.reshape(M, G, K // G) * xs[..., :1]).reshape(M, K)


@triton.jit
def byte_cols(dest_ptr, GROUP: tl.constexpr):
    """(GROUP,) int32: the byte of a group's in-feature i in the kernel's order. dest_ptr: XDEST (16,) int32. A
    constant: the kernels launched with PDL load it before their griddepcontrol.wait, so that the codes' stores do
    not wait on it after (KERNEL_NOTES.md, "Twentieth session")."""
    i = tl.arange(0, GROUP)
    return (i // 16) * 16 + tl.load(dest_ptr + i % 16)


@triton.jit
def quantize_groups(x, q_ptr, s_ptr, k0, col, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """x (GROUPS * GROUP,): one token's in-features k0, k0 + 1, ... (k0 a multiple of GROUP). Stores their int8
    codes in the kernel's byte order at q_ptr + k0 (int8 pointer) and (sx, SX) per group at s_ptr + 2 (k0 / GROUP).
    col: ``byte_cols(XDEST, GROUP)``. Shared by the quantizer launch below, the router (router.py, QUANT) and the
    attention's epilogue (decode_step.py)."""
    xg = tl.reshape(x.to(tl.float32), (GROUPS, GROUP))
    amax = tl.maximum(tl.max(tl.abs(xg), axis=1), _TINY_F)  # (GROUPS,)
    q = _codes(xg, amax[:, None])  # (GROUPS, GROUP)
    gi = tl.arange(0, GROUPS)
    tl.store(q_ptr + k0 + gi[:, None] * GROUP + col[None, :], q.to(tl.int8))
    sp = s_ptr + (k0 // GROUP + gi) * 2
    tl.store(sp, tl.math.div_rn(amax, _QMAX_F))
    tl.store(sp + 1, tl.sum(q, axis=1))


@triton.jit
def _codes(x, amax):
    """floor(x 127 / amax + 1/2) clamped to [-127, 127] (fp32), amax broadcast against x."""
    q = tl.floor(x * tl.math.div_rn(_QMAX_F, amax) + 0.5)
    return tl.minimum(tl.maximum(q, -_QMAX_F), _QMAX_F)


@triton.jit
def quantize_group(x, amax, q_ptr, s_ptr, k0, col, GROUP: tl.constexpr):
    """``quantize_groups`` of one group x (GROUP,) fp32, a one-dimensional tensor, whose max |x| the caller has
    reduced already (amax, a scalar, with other sums in one pass: router.NormFold's tile): the same codes, sx and SX
    without a reshape (whose layout change costs barriers). col: ``byte_cols`` in x's layout."""
    amax = tl.maximum(amax, _TINY_F)
    q = _codes(x, amax)
    tl.store(q_ptr + k0 + col, q.to(tl.int8))
    sp = s_ptr + (k0 // GROUP) * 2
    tl.store(sp, tl.math.div_rn(amax, _QMAX_F))
    tl.store(sp + 1, tl.sum(q, axis=0))


@triton.jit
def _quantize_x_kernel(x_ptr, q_ptr, s_ptr, dest_ptr, K, G, stride_xm, GROUP: tl.constexpr):
    """One program per (token, group)."""
    m = tl.program_id(0)
    gi = tl.program_id(1)
    x = tl.load(x_ptr + m * stride_xm + gi * GROUP + tl.arange(0, GROUP))
    quantize_groups(x, q_ptr + m * K, s_ptr + m * G * 2, gi * GROUP, byte_cols(dest_ptr, GROUP), 1, GROUP)


_DEST: dict[torch.device, torch.Tensor] = {}


def quantize_x_int8(x: torch.Tensor, group_size: int = 128, out: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (xq (M, K/4) int32, xs (M, G, 2) fp32) for ``sliced_gemv_cc(..., x_int8=)`` (one launch, grid
    (M, G)). ``out``: preallocated (xq, xs), e.g. inside a CUDA graph. Rounding: floor(x 127 / amax + 1/2); a CUDA
    build may fuse the multiply and add, so a code can differ by one from ``quantize_x_int8_ref`` at a tie."""
    M, K = _check(x, group_size)
    G = K // group_size
    if out is None:
        xq = torch.empty((M, K // 4), dtype=torch.int32, device=x.device)
        xs = torch.empty((M, G, 2), dtype=torch.float32, device=x.device)
    else:
        xq, xs = out
        check_x_int8(out, M, K, group_size, x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    _quantize_x_kernel[(M, G)](x, xq.view(torch.int8), xs, xdest(x.device), K, G, x.stride(0), GROUP=group_size,
                               num_warps=1)
    return xq, xs


def xdest(device) -> torch.Tensor:
    """XDEST as an int32 tensor on ``device`` (cached): the kernels' table of byte positions."""
    dest = _DEST.get(device)
    if dest is None:
        dest = _DEST[device] = torch.tensor(XDEST, dtype=torch.int32, device=device)
    return dest


def check_x_int8(x_int8: tuple[torch.Tensor, torch.Tensor], M: int, K: int, group_size: int, device) -> None:
    """Raise ValueError unless x_int8 = (xq (M, K/4) int32, xs (M, K/g, 2) fp32), contiguous, on ``device``."""
    xq, xs = x_int8
    G = K // group_size
    if (xq.shape != (M, K // 4) or xq.dtype != torch.int32 or xs.shape != (M, G, 2) or xs.dtype != torch.float32
            or not (xq.is_contiguous() and xs.is_contiguous()) or xq.device != device or xs.device != device):
        raise ValueError(f"x_int8 must be (xq ({M}, {K // 4}) int32, xs ({M}, {G}, 2) fp32), contiguous, on "
                         f"{device} (act_int8.quantize_x_int8), got {tuple(xq.shape)} {xq.dtype}, "
                         f"{tuple(xs.shape)} {xs.dtype}")


__all__ = ["quantize_x_int8", "quantize_x_int8_ref", "dequantize_x_int8", "quantize_groups", "quantize_group",
           "byte_cols", "check_x_int8", "xdest", "XPERM", "QMAX"]
