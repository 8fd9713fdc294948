"""MoBiSlice: a weight as a base slice plus recursive residual slices (paper §4.1, App. B).

Notation (../shared/docs/paper-notes.md §2), all per output row and group of ``g`` consecutive input weights:

    W   (N, K)      weight; N = out_features, K = in_features, G = K // g groups per row
    b_e             bits of slice e = 1..E;   B_k = b_1 + ... + b_k  (bits of the first k slices)
    s_1, z_1 (N, G) base scale and zero point: the only stored quantization parameters
    s_k             = s_1 / 2^(B_k - b_1)      step of the first k slices (derived, never stored)
    c_e   (N, K)    code of slice e in [0, 2^b_e)
    Q_k   (N, K)    = (Q_{k-1} << b_k) + c_k   the B_k-bit code of the first k slices (shift-and-add)
    Ŵ_k   (N, K)    = s_k (Q_k - Z_k),  Z_k = 2^(B_k - b_1) z_1 - 1/2

Floor-aligned ("truncation-ready") codes make the slices nest: Q_k = Q_{k+1} >> b_{k+1}, so running at k slices is the
same as dropping low bits, never requantizing. Each k is itself a plain B_k-bit *mid-rise* floor quantizer on the same
range [-z_1 s_1, (2^b_1 - z_1) s_1]:  Ŵ_k = s_k (floor(W / s_k + 2^(B_k - b_1) z_1) + 1/2), clamped to the range.

The paper defines residual slices recursively (slice e quantizes W - Ŵ_{e-1} with step s_e and the midpoint zero
point 2^(b_e - 1)); that is the same code as the bit field of Q_E computed here (tests check both ways). Computing Q_E
once and cutting it into bit fields keeps the nesting exact in floating point, because scaling by a power of two is
exact: W / s_k = 2^(B_k - b_1) (W / s_1) bit for bit.

The output of a linear is linear in the slices (paper Eq. 6):  y = Σ_{e ≤ k} x ΔŴ_eᵀ with ΔŴ_1 = Ŵ_1 and
ΔŴ_e = s_e (c_e - (2^b_e - 1) / 2) for e ≥ 2: each residual slice adds a zero-mean correction below half a coarse step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Scales are stored in fp16 (one per group, as in the paper); a constant group would give s_1 = 0.
MIN_SCALE = 2.0**-14
STORAGE_DTYPE = torch.float16


def cumulative_bits(slice_bits: Sequence[int]) -> list[int]:
    """B_k for k = 1..E: ``cumulative_bits((2, 2, 2, 2)) == [2, 4, 6, 8]``."""
    out, total = [], 0
    for b in slice_bits:
        total += int(b)
        out.append(total)
    return out


def group_view(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, g). K must be a multiple of ``group_size`` (the config checks it with a clear message)."""
    N, K = W.shape
    assert K % group_size == 0, f"in_features {K} is not a multiple of group_size {group_size}"
    return W.reshape(N, K // group_size, group_size)


def base_qparams(
    W: torch.Tensor,
    group_size: int,
    base_bits: int,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
    storage_dtype: torch.dtype | None = STORAGE_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric base scale s_1 and zero point z_1 of the b_1-bit base slice, each (N, G) in fp32.

    The range is [clip_min * min(W_g), clip_max * max(W_g)] (OmniQuant's learnable weight clipping form; the
    calibration passes sigmoid(γ), sigmoid(β)), split into 2^b_1 equal cells (mid-rise: the levels are the cell
    centres), so s_1 = range / 2^b_1 and z_1 = -min / s_1 is a real number, not rounded: every precision k tiles the
    same range exactly. With ``storage_dtype`` the parameters are rounded to it (fp16) so that codes are computed
    from exactly the values that will be stored; pass None to keep them differentiable for calibration.
    """
    Wg = group_view(W.float(), group_size)  # (N, G, g)
    xmax, xmin = Wg.amax(dim=-1), Wg.amin(dim=-1)  # (N, G)
    if clip_max is not None:
        xmax = xmax * clip_max
    if clip_min is not None:
        xmin = xmin * clip_min
    s_1 = ((xmax - xmin) / 2**base_bits).clamp_min(MIN_SCALE)
    z_1 = -xmin / s_1
    if storage_dtype is not None:
        s_1 = s_1.to(storage_dtype).float()
        z_1 = z_1.to(storage_dtype).float()
    return s_1, z_1


def quantize_codes(W: torch.Tensor, s_1: torch.Tensor, z_1: torch.Tensor, slice_bits: Sequence[int]) -> torch.Tensor:
    """Q_E (N, K) int32: the full B_E-bit floor-aligned code, clamped to [0, 2^B_E)."""
    B = cumulative_bits(slice_bits)
    shift = B[-1] - B[0]
    g = W.shape[1] // s_1.shape[1]
    u = group_view(W.float(), g) / s_1[..., None] + z_1[..., None]  # (N, G, g): position in base cells
    Q = torch.floor(u * 2.0**shift).clamp_(0, 2 ** B[-1] - 1)
    return Q.reshape(W.shape).to(torch.int32)


def split_slices(Q_E: torch.Tensor, slice_bits: Sequence[int]) -> list[torch.Tensor]:
    """Cut Q_E into its E slice codes c_e (uint8 each, slice 1 = most significant bits)."""
    B = cumulative_bits(slice_bits)
    return [((Q_E >> (B[-1] - B_e)) & (2**b - 1)).to(torch.uint8) for b, B_e in zip(slice_bits, B)]


def decompose(
    W: torch.Tensor,
    group_size: int,
    slice_bits: Sequence[int],
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """W (N, K) -> (slice codes [c_1..c_E], s_1, z_1). The main entry point of this file."""
    s_1, z_1 = base_qparams(W, group_size, slice_bits[0], clip_max, clip_min)
    return split_slices(quantize_codes(W, s_1, z_1, slice_bits), slice_bits), s_1, z_1


def combine(codes: Sequence[torch.Tensor], slice_bits: Sequence[int]) -> torch.Tensor:
    """Shift-and-add the first k = len(codes) slices into Q_k (int32): Q_k = (Q_{k-1} << b_k) + c_k."""
    Q = torch.zeros_like(codes[0], dtype=torch.int32)
    for c, b in zip(codes, slice_bits):
        Q = (Q << b) + c.to(torch.int32)
    return Q


def affine_params(s_1: torch.Tensor, z_1: torch.Tensor, slice_bits: Sequence[int], k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_k, Z_k), each (N, G): the step and zero point of the first k slices as a plain affine quantizer,
    Ŵ_k = s_k (Q_k - Z_k). Exact in floating point: s_k and 2^(B_k - b_1) z_1 are s_1 and z_1 scaled by powers of 2."""
    shift = cumulative_bits(slice_bits)[k - 1] - slice_bits[0]
    return s_1 * 2.0**-shift, z_1 * 2.0**shift - 0.5


def dequantize(Q_k: torch.Tensor, s_1: torch.Tensor, z_1: torch.Tensor, slice_bits: Sequence[int], k: int
               ) -> torch.Tensor:
    """Ŵ_k = s_k (Q_k - Z_k) in fp32, (N, K): one shared scale per group, whatever k is."""
    g = Q_k.shape[1] // s_1.shape[1]
    s_k, Z_k = affine_params(s_1, z_1, slice_bits, k)  # (N, G) each
    W_k = s_k[..., None] * (group_view(Q_k.float(), g) - Z_k[..., None])
    return W_k.reshape(Q_k.shape)


def reconstruct(codes: Sequence[torch.Tensor], s_1, z_1, slice_bits: Sequence[int]) -> torch.Tensor:
    """Ŵ_k from the first k = len(codes) slices."""
    return dequantize(combine(codes, slice_bits), s_1, z_1, slice_bits, len(codes))


def slice_delta(c_e: torch.Tensor, s_1, z_1, slice_bits: Sequence[int], e: int) -> torch.Tensor:
    """ΔŴ_e = Ŵ_e - Ŵ_{e-1} (fp32, (N, K)) from slice e's codes alone (e is 1-based; ΔŴ_1 = Ŵ_1)."""
    if e == 1:
        return dequantize(c_e.to(torch.int32), s_1, z_1, slice_bits, 1)
    shift = cumulative_bits(slice_bits)[e - 1] - slice_bits[0]
    g = c_e.shape[1] // s_1.shape[1]
    s_e = s_1 * 2.0**-shift
    mid = (2 ** slice_bits[e - 1] - 1) / 2  # fixed midpoint zero point: symmetric ± corrections (App. B)
    return (s_e[..., None] * (group_view(c_e.float(), g) - mid)).reshape(c_e.shape)


class _FakeQuantizeLevels(torch.autograd.Function):
    """[Ŵ_k for k in ks] from one pass over W, with the straight-through gradient written out (the autograd graph of
    the plain formula costs ~25 elementwise ops per level; this backward costs 6).

    Per level k (h = B_k - b_1, s_k = 2^-h s_1, Z = 2^h z_1):  u = 2^h (W / s_1 + z_1) = W / s_k + Z (exact: a power
    of two),  q = clamp(floor(u), 0, 2^B_k - 1),  Ŵ_k = s_k (q - Z + 1/2).  With the STE (dq/du = 1 where floor(u) is
    in range, else 0; in = that mask):
        dŴ_k/ds_1 = 2^-h (q - Z + 1/2) - in · W / s_1,     dŴ_k/dz_1 = -s_1 (1 - in)
    """

    @staticmethod
    def forward(ctx, W, s_1, z_1, shifts, tops):
        # W (N, K) constant; s_1, z_1 (N, G)  ->  one (N, K) tensor per level
        g = W.shape[1] // s_1.shape[1]
        w1 = group_view(W.float(), g) / s_1[..., None]  # (N, G, g): W / s_1
        v = w1 + z_1[..., None]
        outs, saved = [], []
        for h, top in zip(shifts, tops):
            fl = torch.floor(v * 2.0**h)
            q = fl.clamp(0, top)
            a = q - (z_1 * 2.0**h)[..., None] + 0.5  # (N, G, g)
            outs.append(((s_1 * 2.0**-h)[..., None] * a).reshape(W.shape))
            saved += [a, q == fl]
        ctx.save_for_backward(s_1, w1, *saved)
        ctx.shifts = shifts
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        s_1, w1, *saved = ctx.saved_tensors
        gs, gz = torch.zeros_like(s_1), torch.zeros_like(s_1)
        for h, G, a, inr in zip(ctx.shifts, grads, saved[::2], saved[1::2]):
            if G is None:
                continue
            G = G.reshape(a.shape)
            gs += (G * (a - inr * w1 * 2.0**h)).sum(-1) * 2.0**-h
            gz += (G * ~inr).sum(-1)
        return None, gs, -s_1 * gz, None, None


def fake_quantize_ste(W: torch.Tensor, s_1: torch.Tensor, z_1: torch.Tensor, slice_bits: Sequence[int],
                      k: int | Sequence[int]):
    """Differentiable Ŵ_k for calibration: floor with a straight-through gradient; gradients reach s_1 and z_1.
    ``k`` an int: Ŵ_k; a sequence of ints: the list [Ŵ_k for k in it], computed in one pass.

    Same values as ``dequantize(quantize_codes(...) >> ..., ...)`` for the first k slices.
    """
    ks = [k] if isinstance(k, int) else list(k)
    B = cumulative_bits(slice_bits)
    shifts = tuple(B[j - 1] - slice_bits[0] for j in ks)
    tops = tuple(2 ** B[j - 1] - 1 for j in ks)
    outs = list(_FakeQuantizeLevels.apply(W, s_1, z_1, shifts, tops))
    return outs[0] if isinstance(k, int) else outs
