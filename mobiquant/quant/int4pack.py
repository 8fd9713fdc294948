"""Ŵ_k of at most 4 bits as torch's CPU int4 weight: packed codes and bf16 scales and zeros, for a faster CPU decode.

A precision of B_k <= 4 bits is an affine group-wise quantizer with codes Q_k in [0, 16) (slices.py):

    Ŵ_k = s_k (Q_k - Z_k)                                   per group of g weights along K

which is exactly the form that ``torch._weight_int4pack_mm_for_cpu`` dequantizes on the fly (aten
``native/cpu/int4mm_kernel.cpp``: the code q in [0, 16) is read as the signed q - 8):

    w = (q - 8) * scale + zero   with   q = Q_k + 8 - h,  scale = s_k,  zero = s_k (h - Z_k),  h = 2^(B_k - 1)

The codes are stored shifted so that q - 8 = Q_k - h is centred on zero: the zero point then stays near s_k / 2
(Z_k is near h for a group centred on 0) instead of near 6.5 s_k for 2-bit codes read as q - 8, and its bf16
rounding error stays far below a step. Only scale and zero are rounded, to bf16 (the kernel reads them in the
activations' dtype; bf16 is the one with a vectorised kernel on x86, fp16 and fp32 run a scalar loop): Ŵ_k's error
is that of bf16 weights, the codes are exact.

    W4 = pack_int4(Q_k, s_k, Z_k, B_k, group_size)          # Int4Weight, built once per precision
    y = int4_linear(x, W4, bias)                            # x (..., K) any float dtype -> y (..., N) in x's dtype

A decode step reads 4 bits per weight plus 32 bits of scale and zero per group instead of fp16's 16: the kernel is
about 1.5x faster than the fp16 dense product for the embedded model's shapes on one core, and several times faster
for a prompt (a CPU has no fp16 GEMM). Products are computed in fp32 from bf16 activations and rounded to bf16:
bf16 has fp32's exponent range, so unlike the fp16 dense path the output cannot overflow.

The packed layout depends on the CPU's vector width (AVX-512 or AVX2 blocks) where it is made: build it on the
machine that runs it, never store it. ``available()`` says whether this torch build has the ops and that they
compute the convention above (checked once on a small matrix); where it is False, callers keep the fp16 dense path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128, 256)  # the kernel's supported groups (BLOCK_K)
COMPUTE_DTYPE = torch.bfloat16
_OFFSET = 8  # the kernel reads a code q as q - 8


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor  # (N, K / 2) uint8, the kernel's layout for this CPU
    scales_and_zeros: torch.Tensor  # (G, N, 2) bf16: [..., 0] = s_k, [..., 1] = s_k (h - Z_k)
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether a weight of this shape and group size has the kernel's layout (N % 16, even K, g in GROUP_SIZES)."""
    return out_features % 16 == 0 and in_features % 2 == 0 and group_size in GROUP_SIZES


def pack_int4(Q: torch.Tensor, s: torch.Tensor, Z: torch.Tensor, bits: int, group_size: int) -> Int4Weight:
    """Codes Q (N, K) in [0, 2^bits), bits <= 4, and the affine parameters s, Z (N, G) of Ŵ = s (Q - Z) per group of
    ``group_size`` along K -> Int4Weight (CPU)."""
    N, K = Q.shape
    if not 1 <= bits <= 4:
        raise ValueError(f"int4 holds codes of 1 to 4 bits, not {bits}")
    if not fits(N, K, group_size):
        raise ValueError(f"an ({N}, {K}) weight with group size {group_size} has no int4 layout")
    if int(Q.min()) < 0 or int(Q.max()) >= 2**bits:
        raise ValueError(f"{bits}-bit codes must lie in [0, {2**bits})")
    h = 2 ** (bits - 1)  # stored code q = Q + 8 - h: the kernel's q - 8 is Q - h
    s, Z = s.float().cpu(), Z.float().cpu()
    scales_and_zeros = torch.stack([s, s * (h - Z)], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
    q = (Q.to(device="cpu", dtype=torch.int32) + (_OFFSET - h)).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # the CPU op ignores its inner-k-tiles argument
    return Int4Weight(packed, scales_and_zeros, group_size)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) Ŵᵀ (+ bias) on the CPU: computed from bf16 activations, returned in x's dtype (bias added in it).
    Four torch calls for a decode token (cast, product, cast back, view): each costs a few µs on a CPU."""
    x2 = x.reshape(-1, x.shape[-1]).bfloat16()
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
    y = y.float() if x.dtype is torch.float32 else y.to(x.dtype)  # .float(): the cheaper call for the common case
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y.add_(bias)


@functools.cache
def available() -> bool:
    """Whether torch has the CPU int4 ops and they dequantize as ``(q - 8) * scale + zero`` (checked once)."""
    if not (hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        N, K, g = 32, 64, 32
        Q = torch.randint(0, 16, (N, K), generator=gen)
        s = torch.rand(N, K // g, generator=gen) + 0.5
        Z = torch.rand(N, K // g, generator=gen) * 16
        x = torch.randn(3, K, generator=gen)
        w = pack_int4(Q, s, Z, 4, g)
        sz = w.scales_and_zeros.float()  # the rounded parameters the kernel reads
        W = (Q.float().reshape(N, K // g, g) - _OFFSET) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
        ref = x.to(COMPUTE_DTYPE).float() @ W.reshape(N, K).T
        return bool(torch.allclose(int4_linear(x, w), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())))
    except (RuntimeError, NotImplementedError):
        return False
