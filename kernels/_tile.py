"""Shared Triton building blocks of the sliced kernels: unpacking a word tile and the per-group loop.

The decode kernel (``sliced_gemv.py``) computes, for a tile of BLOCK_N output rows and BLOCK_M (padded) tokens, the
transposed product  acc (BLOCK_N, BLOCK_M) = Ŵ_tile · x_tileᵀ  group by group (``group_loop``):

    for each group g (g = 128 input features, one shared scale s_1 and zero point z_1 per row):
        Qb  = BIAS + Q_k            (BLOCK_N, g)  fp16/bf16, exact: k planes merged by bit-plane shift-and-add
        D   = dot(Qb, x_gᵀ)         (BLOCK_N, BLOCK_M)  tensor cores, fp32 accumulation
        X   = Σ_{i in g} x_i        per token: a second tiny dot with a ones tile (XS_DOT=1), a tl.sum (2)
        acc += s_k · D + X · (s_k (1/2 - BIAS) - s_1 z_1)            # = s_k Q_k + o_k summed over the group

The prefill kernel (``sliced_gemm.py``) uses ``group_loop_dq`` instead: the same unpacking, then Ŵ dequantised per
weight (fp32 math, one rounding to fp16/bf16) and the dots chained into one accumulator, which keeps the tensor cores
busy when BLOCK_M is large. Its tiles are always uniform: it tiles the tokens of each slice count separately.

The scale and zero point are applied once per group and row, never per weight, and the zero point goes through the
group sum of x (Ŵ_k = s_k Q_k + o_k, o_k = s_k / 2 - z_1 s_1). BIAS is the value of the "magic" exponent: a code
OR-ed into the mantissa of 1024.0 (fp16, 0x6400) or 128.0 (bf16, 0x4300) *is* BIAS + code as a float, so the
integer -> float conversion costs no instruction; BIAS · X is taken out in the epilogue.

Decode: uniform tiles (every token at k slices) merge the k planes in integers and run one dot. Mixed tiles (tokens at
different k, or bf16 at k = 4 where 8-bit codes do not fit bf16's 7-bit mantissa) run one dot per slice e with the
tokens that use it (x masked by k_t > e) and combine  D = Σ_e 4^-e D_e : since s_e = s_1 4^-(e-1), every slice shares
the base scale. A plane is loaded only if some token of the tile needs it.

Unpacking (``USE_ASM``): one inline-PTX block per int32 word and plane set turns 16 codes into eight fp16x2
registers (layout.py explains the word layout): per register one shift and one LOP3, after 2 (k = 2) or 6-8 (k = 3, 4)
LOP3/shifts per word that merge the planes: about 1.0 LOP3 + SHF per weight at k = 1 and 2.1 at k = 4 in the SASS
(benchmarks/KERNEL_NOTES.md has the whole loop's count against the budget). The
interpreter (TRITON_INTERPRET=1, CPU tests) cannot run PTX, so ``USE_ASM=False`` computes the same values with plain
shifts and masks; both feed the same ``tl.join`` tree.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = {"fp16": 0x64006400, "bf16": 0x43004300}
BIAS = {"fp16": 1024.0, "bf16": 128.0}
QBITS = {"fp16": 10, "bf16": 7}  # mantissa bits: Q_k must fit below BIAS exactly


def merge_planes_ptx(ks: int, words: list[str]) -> tuple[list[str], list[tuple[str, int, int]]]:
    """PTX that merges KS plane words (register names ``words``, plane 1 first) into fields Q_k, and per output
    register j (slots j and j + 8) the (source register, bit position in each 16-bit half, field width) it reads.

    k = 1: the word itself (2-bit fields at 2j).  k = 2: nibble n of u_m = (c_1 << 2 | c_2) of slot 2n + m.
    k = 3, 4: byte b of u_m = Q_k of slot 4b + m (6 or 8 bits). Temporaries: t, u0..u3 (the caller declares them).
    Shared by this file's unpacking and the v7 word dot (sliced_gemv_cc.py); only the per-register step differs.
    """
    w = words
    L = []
    if ks == 1:
        return L, [(w[0], 2 * j, 2) for j in range(8)]
    if ks == 2:
        L += [f"shl.b32 t, {w[0]}, 2;", f"lop3.b32 u0, t, {w[1]}, 0xCCCCCCCC, 0xE4;",  # (a & c) | (b & ~c)
              f"shr.u32 t, {w[1]}, 2;", f"lop3.b32 u1, {w[0]}, t, 0xCCCCCCCC, 0xE4;"]
        return L, [(f"u{j % 2}", 4 * (j // 2), 4) for j in range(8)]
    for m in range(4):
        src = w[ks - 1]
        if m:
            L.append(f"shr.u32 t, {src}, {2 * m};")
            src = "t"
        L.append(f"and.b32 u{m}, {src}, 0x03030303;")
        for e in range(ks - 2, -1, -1):
            sh, src = 2 * (ks - 1 - e) - 2 * m, w[e]
            if sh > 0:
                L.append(f"shl.b32 t, {src}, {sh};")
                src = "t"
            elif sh < 0:
                L.append(f"shr.u32 t, {src}, {-sh};")
                src = "t"
            L.append(f"lop3.b32 u{m}, {src}, u{m}, {hex(0x03030303 << 2 * (ks - 1 - e))}, 0xE4;")
    return L, [(f"u{j % 4}", 8 * (j // 4), 2 * ks) for j in range(8)]


def _asm_text(ks: int, magic: int) -> str:
    """PTX: KS plane words $16.. (plane 1 first) -> 16 halves $0..$15, register j = ($2j, $2j+1) = slots (j, j+8)."""
    mg = hex(magic)
    merge, fields = merge_planes_ptx(ks, [f"${16 + e}" for e in range(ks)])
    L = ["{", ".reg .b32 t, r, u0, u1, u2, u3;", *merge]
    for j, (src, p, b) in enumerate(fields):  # field -> mantissa of BIAS: (word >> p) & mask | magic
        if p:
            L.append(f"shr.u32 t, {src}, {p};")
            src = "t"
        fmask = (1 << b) - 1 if b <= 4 else 0xFF  # 6- and 8-bit fields: the whole byte (bits above Q_3 are 0)
        L.append(f"lop3.b32 r, {src}, 0x{fmask | fmask << 16:08X}, {mg}, 0xEA;")  # (a & b) | c
        L.append(f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, r;")
    L.append("}")
    return "\n".join(L)


ASM_F16_1 = tl.constexpr(_asm_text(1, MAGIC["fp16"]))
ASM_F16_2 = tl.constexpr(_asm_text(2, MAGIC["fp16"]))
ASM_F16_3 = tl.constexpr(_asm_text(3, MAGIC["fp16"]))
ASM_F16_4 = tl.constexpr(_asm_text(4, MAGIC["fp16"]))
ASM_BF16_1 = tl.constexpr(_asm_text(1, MAGIC["bf16"]))
ASM_BF16_2 = tl.constexpr(_asm_text(2, MAGIC["bf16"]))
ASM_BF16_3 = tl.constexpr(_asm_text(3, MAGIC["bf16"]))
F16X16 = tl.constexpr((tl.float16,) * 16)  # dtypes of the 16 outputs of the unpacking PTX
BF16X16 = tl.constexpr((tl.bfloat16,) * 16)
CONS_1 = tl.constexpr("=h," * 16 + "r")
CONS_2 = tl.constexpr("=h," * 16 + "r,r")
CONS_3 = tl.constexpr("=h," * 16 + "r,r,r")
CONS_4 = tl.constexpr("=h," * 16 + "r,r,r,r")


@triton.jit
def _field(w0, w1, w2, w3, SLOT: tl.constexpr, KS: tl.constexpr, BIAS_V: tl.constexpr, DT: tl.constexpr):
    """BIAS + Q_KS of bit slot SLOT of each word, without PTX (interpreter path)."""
    q = (w0 >> (2 * SLOT)) & 3
    if KS > 1:
        q = q * 4 + ((w1 >> (2 * SLOT)) & 3)
    if KS > 2:
        q = q * 4 + ((w2 >> (2 * SLOT)) & 3)
    if KS > 3:
        q = q * 4 + ((w3 >> (2 * SLOT)) & 3)
    return (q.to(tl.float32) + BIAS_V).to(DT)


@triton.jit
def load_planes(wp, plane_stride, mask, KS: tl.constexpr):
    """The word tiles of the first KS planes at ``wp`` (plane e at wp + e * plane_stride); unused planes repeat w0."""
    w0 = tl.load(wp, mask=mask, other=0)
    w1 = w0
    w2 = w0
    w3 = w0
    if KS > 1:
        w1 = tl.load(wp + plane_stride, mask=mask, other=0)
    if KS > 2:
        w2 = tl.load(wp + 2 * plane_stride, mask=mask, other=0)
    if KS > 3:
        w3 = tl.load(wp + 3 * plane_stride, mask=mask, other=0)
    return w0, w1, w2, w3


@triton.jit
def unpack_tile(w0, w1, w2, w3, KS: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """Words (BN, W) int32 of planes 1..KS (unused ones may repeat w0) -> (BN, 16 W) DT tile of BIAS + Q_KS."""
    if DT == tl.float16:
        BIAS_V: tl.constexpr = 1024.0
    else:
        BIAS_V: tl.constexpr = 128.0
    if USE_ASM:
        if DT == tl.float16:
            if KS == 1:
                v = tl.inline_asm_elementwise(ASM_F16_1, CONS_1, [w0], dtype=F16X16, is_pure=True, pack=1)
            elif KS == 2:
                v = tl.inline_asm_elementwise(ASM_F16_2, CONS_2, [w0, w1], dtype=F16X16, is_pure=True, pack=1)
            elif KS == 3:
                v = tl.inline_asm_elementwise(ASM_F16_3, CONS_3, [w0, w1, w2], dtype=F16X16, is_pure=True, pack=1)
            else:
                v = tl.inline_asm_elementwise(ASM_F16_4, CONS_4, [w0, w1, w2, w3], dtype=F16X16, is_pure=True, pack=1)
        else:
            if KS == 1:
                v = tl.inline_asm_elementwise(ASM_BF16_1, CONS_1, [w0], dtype=BF16X16, is_pure=True, pack=1)
            elif KS == 2:
                v = tl.inline_asm_elementwise(ASM_BF16_2, CONS_2, [w0, w1], dtype=BF16X16, is_pure=True, pack=1)
            else:
                v = tl.inline_asm_elementwise(ASM_BF16_3, CONS_3, [w0, w1, w2], dtype=BF16X16, is_pure=True, pack=1)
        v0, v1, v2, v3, v4, v5, v6, v7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        v8, v9, v10, v11, v12, v13, v14, v15 = v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]
    else:  # output v = 2 j + h holds slot j + 8 h (as the PTX does)
        v0 = _field(w0, w1, w2, w3, 0, KS, BIAS_V, DT)
        v1 = _field(w0, w1, w2, w3, 8, KS, BIAS_V, DT)
        v2 = _field(w0, w1, w2, w3, 1, KS, BIAS_V, DT)
        v3 = _field(w0, w1, w2, w3, 9, KS, BIAS_V, DT)
        v4 = _field(w0, w1, w2, w3, 2, KS, BIAS_V, DT)
        v5 = _field(w0, w1, w2, w3, 10, KS, BIAS_V, DT)
        v6 = _field(w0, w1, w2, w3, 3, KS, BIAS_V, DT)
        v7 = _field(w0, w1, w2, w3, 11, KS, BIAS_V, DT)
        v8 = _field(w0, w1, w2, w3, 4, KS, BIAS_V, DT)
        v9 = _field(w0, w1, w2, w3, 12, KS, BIAS_V, DT)
        v10 = _field(w0, w1, w2, w3, 5, KS, BIAS_V, DT)
        v11 = _field(w0, w1, w2, w3, 13, KS, BIAS_V, DT)
        v12 = _field(w0, w1, w2, w3, 6, KS, BIAS_V, DT)
        v13 = _field(w0, w1, w2, w3, 14, KS, BIAS_V, DT)
        v14 = _field(w0, w1, w2, w3, 7, KS, BIAS_V, DT)
        v15 = _field(w0, w1, w2, w3, 15, KS, BIAS_V, DT)
    # join tree (layout.SLOT replays it): pairs (i, i + 8), then (i, i + 4), (i, i + 2), (0, 1)
    a0, a1, a2, a3 = tl.join(v0, v8), tl.join(v1, v9), tl.join(v2, v10), tl.join(v3, v11)
    a4, a5, a6, a7 = tl.join(v4, v12), tl.join(v5, v13), tl.join(v6, v14), tl.join(v7, v15)
    b0, b1, b2, b3 = tl.join(a0, a4), tl.join(a1, a5), tl.join(a2, a6), tl.join(a3, a7)
    c0, c1 = tl.join(b0, b2), tl.join(b1, b3)
    d = tl.join(c0, c1)  # (BN, W, 2, 2, 2, 2)
    return tl.reshape(d, (d.shape[0], d.shape[1] * 16))


@triton.jit
def _dot(a, b, USE_ASM: tl.constexpr):
    """tl.dot; on the PTX-free path bf16 operands go through fp32 (the interpreter's bf16 dot is wrong, and tf32
    holds bf16 values and BIAS + Q exactly, so on a GPU the result is the same)."""
    if (not USE_ASM) and (a.dtype == tl.bfloat16):
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _load_group(g, g_hi, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, N,
                KS: tl.constexpr, GROUP: tl.constexpr):
    """Issue the loads of group g (all masked off when g >= g_hi): x (BM, GROUP), s_1 and z_1 (BN,), KS word tiles."""
    WPG: tl.constexpr = GROUP // 16
    v = (tl.full((1,), 0, tl.int32) + g) < g_hi  # (1,) so that it broadcasts into every mask
    x = tl.load(x_ptrs + g * GROUP, mask=x_mask & v, other=0.0)
    s = tl.load(s_ptrs + g * N, mask=n_mask & v, other=0.0)
    z = tl.load(z_ptrs + g * N, mask=n_mask & v, other=0.0)
    w0, w1, w2, w3 = load_planes(w_ptrs + g * (N * WPG), plane_stride, w_mask & v, KS)  # group-major words
    return x, s, z, w0, w1, w2, w3


@triton.jit
def _group_step(acc, x, s1, z1, w0, w1, w2, w3, kt, ct, ones, xs_ptrs, g, stride_xs_g, F: tl.constexpr,
                KS: tl.constexpr, COMBINE: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr,
                XS_DOT: tl.constexpr):
    """acc += one group's contribution (see the module docstring)."""
    s1 = s1.to(tl.float32)
    z1 = z1.to(tl.float32)
    if XS_DOT == 1:
        X = _dot(ones, tl.trans(x), USE_ASM)  # (BN, BM) group sums of x on the tensor cores (v1-v4)
    elif XS_DOT == 2:
        X = tl.sum(x.to(tl.float32), axis=1)[None, :]  # (1, BM) on the CUDA cores: halves the tensor-core work
    else:
        X = tl.load(xs_ptrs + g * stride_xs_g)[None, :]  # (1, BM) fp32
    if COMBINE == 0:  # uniform tile: the KS planes merged into Q_KS, one dot
        q = unpack_tile(w0, w1, w2, w3, KS, DT, USE_ASM)  # (BN, GROUP)
        D = _dot(q, tl.trans(x), USE_ASM)
    else:  # mixed tile (or bf16 at k = 4): x masked by k_t > e, one dot per slice
        q = unpack_tile(w0, w0, w0, w0, 1, DT, USE_ASM)
        D = _dot(q, tl.trans(tl.where(kt[:, None] > 0, x, 0.0).to(DT)), USE_ASM)
        if KS > 1:
            q = unpack_tile(w1, w1, w1, w1, 1, DT, USE_ASM)
            D += _dot(q, tl.trans(tl.where(kt[:, None] > 1, x, 0.0).to(DT)), USE_ASM) * 0.25
        if KS > 2:
            q = unpack_tile(w2, w2, w2, w2, 1, DT, USE_ASM)
            D += _dot(q, tl.trans(tl.where(kt[:, None] > 2, x, 0.0).to(DT)), USE_ASM) * 0.0625
        if KS > 3:
            q = unpack_tile(w3, w3, w3, w3, 1, DT, USE_ASM)
            D += _dot(q, tl.trans(tl.where(kt[:, None] > 3, x, 0.0).to(DT)), USE_ASM) * 0.015625
    return acc + (s1 * F)[:, None] * (D + X * (ct[None, :] - (z1 / F)[:, None]))


@triton.jit
def group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask, kt, g_lo, g_hi,
               N, stride_xs_g, KS: tl.constexpr, MIXED: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr,
               USE_ASM: tl.constexpr, XS_DOT: tl.constexpr, GPI_: tl.constexpr):
    """acc (BN, BM) += Σ_{g in [g_lo, g_hi)} Ŵ_k,g x_gᵀ for a tile whose tokens use at most KS slices.

    w_ptrs (BN, GROUP/16) int32 pointers to plane 1, group 0 (group-major words: group g at + g N GROUP/16);
    x_ptrs (BM, GROUP) pointers to group 0 (row-major, so that x loads are 16-byte vectors);
    xs_ptrs (BM,) pointers to precomputed group sums (XS_DOT=0); s_ptrs/z_ptrs (BN,) to group 0 of scale/zero.
    GPI_: 0 = loads at their use, pipelined by Triton (num_stages >= 2; the tuned default); 1 = loads issued one group
    ahead by hand; 2 = two groups per iteration.
    MIXED: one dot per slice with the tokens that use it; else the KS planes are merged into Q_KS (one dot).
    """
    if DT == tl.float16:
        BIAS_V: tl.constexpr = 1024.0
        Q_BITS: tl.constexpr = 10
    else:
        BIAS_V: tl.constexpr = 128.0
        Q_BITS: tl.constexpr = 7
    FITS: tl.constexpr = 2 * KS <= Q_BITS  # Q_KS fits below BIAS exactly
    if FITS and (not MIXED):
        COMBINE: tl.constexpr = 0  # uniform tile: merged planes, one dot
    else:
        COMBINE: tl.constexpr = 1  # mixed tile (or bf16 at k = 4): one dot per slice
    # (v6 tried one merged dot per level for mixed tiles: 864 SASS instructions per iteration against 840 for this
    # per-slice path at KS = 4, so it was dropped unmeasured; see KERNEL_NOTES.md)
    BN: tl.constexpr = w_ptrs.shape[0]
    GPI: tl.constexpr = GPI_ if (COMBINE == 0 or GPI_ == 0) else 1  # mixed paths: one group per iteration
    kf = kt.to(tl.float32)
    p = tl.exp2(-2.0 * (kf - 1.0))  # 4^-(k_t - 1) = s_k / s_1
    if COMBINE == 0:
        F: tl.constexpr = 1.0 / (4.0 ** (KS - 1))
        ct = p * 0.0 + (0.5 - BIAS_V)  # acc += s_1 F (D + X (1/2 - BIAS - z_1 / F))
    else:
        F: tl.constexpr = 1.0
        ct = 0.5 * p - BIAS_V * (4.0 / 3.0) * (1.0 - 0.25 * p)  # X (s_k/2 - BIAS Σ_{e<k} 4^-e) / s_1
    ones = tl.full((BN, GROUP), 1.0, DT)
    # Software pipelining by hand: the loads of the next iteration are issued before this one is computed (v1 relied
    # on Triton's pipeliner, which staged only the word tiles). GPI = 2 computes two groups per iteration, so the
    # per-iteration latency chain (unpack -> shared memory -> wgmma -> wait -> epilogue) covers twice the bytes.
    if GPI == 0:  # loads at their use; Triton's pipeliner (num_stages >= 2) stages them through shared memory
        for g in range(g_lo, g_hi):
            x, s1, z1, w0, w1, w2, w3 = _load_group(g, g_hi, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs,
                                                    z_ptrs, n_mask, N, KS, GROUP)
            acc = _group_step(acc, x, s1, z1, w0, w1, w2, w3, kt, ct, ones, xs_ptrs, g, stride_xs_g, F, KS, COMBINE,
                              DT, USE_ASM, XS_DOT)
    else:
        xa, sa, za, w0a, w1a, w2a, w3a = _load_group(g_lo, g_hi, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask,
                                                     s_ptrs, z_ptrs, n_mask, N, KS, GROUP)
        if GPI == 2:
            xb, sb, zb, w0b, w1b, w2b, w3b = _load_group(g_lo + 1, g_hi, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask,
                                                         s_ptrs, z_ptrs, n_mask, N, KS, GROUP)
        for g in range(g_lo, g_hi, GPI):
            x, s1, z1, w0, w1, w2, w3 = xa, sa, za, w0a, w1a, w2a, w3a
            xa, sa, za, w0a, w1a, w2a, w3a = _load_group(g + GPI, g_hi, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask,
                                                         s_ptrs, z_ptrs, n_mask, N, KS, GROUP)
            if GPI == 2:
                x2, s2, z2, v0, v1, v2, v3 = xb, sb, zb, w0b, w1b, w2b, w3b
                xb, sb, zb, w0b, w1b, w2b, w3b = _load_group(g + 3, g_hi, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask,
                                                             s_ptrs, z_ptrs, n_mask, N, KS, GROUP)
            acc = _group_step(acc, x, s1, z1, w0, w1, w2, w3, kt, ct, ones, xs_ptrs, g, stride_xs_g, F, KS, COMBINE, DT,
                              USE_ASM, XS_DOT)
            if GPI == 2:  # a group past g_hi was loaded as zeros (scale 0): it adds nothing
                acc = _group_step(acc, x2, s2, z2, v0, v1, v2, v3, kt, ct, ones, xs_ptrs, g + 1, stride_xs_g, F, KS,
                                  COMBINE, DT, USE_ASM, XS_DOT)
    return acc


@triton.jit
def tile_acc(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask, kt, kmin, kmax,
             g_lo, g_hi, N, stride_xs_g, E: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr,
             USE_ASM: tl.constexpr, XS_DOT: tl.constexpr, GPI: tl.constexpr):
    """Pick the specialisation by the tile's slice counts (runtime branch; planes above kmax are never loaded)."""
    if kmin == kmax:
        if kmax == 1:
            acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask, kt,
                             g_lo, g_hi, N, stride_xs_g, 1, False, GROUP, DT, USE_ASM, XS_DOT, GPI)
        elif kmax == 2:
            if E >= 2:
                acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask,
                                 kt, g_lo, g_hi, N, stride_xs_g, 2, False, GROUP, DT, USE_ASM, XS_DOT, GPI)
        elif kmax == 3:
            if E >= 3:
                acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask,
                                 kt, g_lo, g_hi, N, stride_xs_g, 3, False, GROUP, DT, USE_ASM, XS_DOT, GPI)
        else:
            if E >= 4:
                acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask,
                                 kt, g_lo, g_hi, N, stride_xs_g, 4, False, GROUP, DT, USE_ASM, XS_DOT, GPI)
    else:
        if kmax == 2:
            if E >= 2:
                acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask,
                                 kt, g_lo, g_hi, N, stride_xs_g, 2, True, GROUP, DT, USE_ASM, XS_DOT, GPI)
        elif kmax == 3:
            if E >= 3:
                acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask,
                                 kt, g_lo, g_hi, N, stride_xs_g, 3, True, GROUP, DT, USE_ASM, XS_DOT, GPI)
        else:
            if E >= 4:
                acc = group_loop(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, xs_ptrs, s_ptrs, z_ptrs, n_mask,
                                 kt, g_lo, g_hi, N, stride_xs_g, 4, True, GROUP, DT, USE_ASM, XS_DOT, GPI)
    return acc


@triton.jit
def _dot_acc(a, b, acc, USE_ASM: tl.constexpr):
    if (not USE_ASM) and (a.dtype == tl.bfloat16):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def group_loop_dq(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, G, N,
                  KS: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """Prefill variant: dequantize each weight tile to DT (fp32 math, one rounding) and chain the dots.

    acc (BN, BM) += Ŵ_KS x_tileᵀ over all G groups, every token of the tile at KS slices (sliced_gemm gives each
    slice count its own m-tiles). Per weight this costs a few more instructions than the per-group epilogue of
    ``group_loop``, but that cost is shared by BLOCK_M tokens, and the dots chain into one accumulator so the tensor
    cores run asynchronously (no per-group wait). Ŵ_k = s_k Q_k + o_k from the merged planes; where Q_k does not fit
    the mantissa (bf16 at k = 4) slice by slice: slice e adds ΔŴ_e = s_e (c_e - 1.5) (ΔŴ_1 = s_1 (c_1 + 1/2 - z_1)).
    """
    if DT == tl.float16:
        BIAS_V: tl.constexpr = 1024.0
        Q_BITS: tl.constexpr = 10
    else:
        BIAS_V: tl.constexpr = 128.0
        Q_BITS: tl.constexpr = 7
    COMBINE: tl.constexpr = 2 * KS <= Q_BITS
    WPG: tl.constexpr = GROUP // 16
    for g in range(0, G):
        x = tl.load(x_ptrs + g * GROUP, mask=x_mask, other=0.0)  # (BM, GROUP)
        s1 = tl.load(s_ptrs + g * N, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        z1 = tl.load(z_ptrs + g * N, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        wp = w_ptrs + g * (N * WPG)  # group-major words
        if COMBINE:
            w0, w1, w2, w3 = load_planes(wp, plane_stride, w_mask, KS)
            F: tl.constexpr = 1.0 / (4.0 ** (KS - 1))
            q = unpack_tile(w0, w1, w2, w3, KS, DT, USE_ASM).to(tl.float32)  # BIAS + Q_k
            sk = s1 * F
            wt = (q * sk + (sk * (0.5 - BIAS_V) - z1 * s1)).to(DT)  # s_k (Q_k + 1/2) - z_1 s_1
            acc = _dot_acc(wt, tl.trans(x), acc, USE_ASM)
        else:
            for e in tl.static_range(KS):
                we = tl.load(wp + e * plane_stride, mask=w_mask, other=0)
                c = unpack_tile(we, we, we, we, 1, DT, USE_ASM).to(tl.float32)  # BIAS + c_e
                se = s1 * (0.25**e)
                if e == 0:
                    wt = (c * se + (se * (0.5 - BIAS_V) - z1 * s1)).to(DT)
                else:
                    wt = (c * se - se * (BIAS_V + 1.5)).to(DT)
                acc = _dot_acc(wt, tl.trans(x), acc, USE_ASM)
    return acc


@triton.jit
def tile_acc_dq(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, kseg, G, N,
                E: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """``group_loop_dq`` for a tile whose tokens all use ``kseg`` slices (1..E, a device scalar)."""
    if kseg == 1:
        acc = group_loop_dq(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, G, N,
                            1, GROUP, DT, USE_ASM)
    elif kseg == 2:
        if E >= 2:
            acc = group_loop_dq(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, G, N,
                                2, GROUP, DT, USE_ASM)
    elif kseg == 3:
        if E >= 3:
            acc = group_loop_dq(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, G, N,
                                3, GROUP, DT, USE_ASM)
    else:
        if E >= 4:
            acc = group_loop_dq(acc, w_ptrs, w_mask, plane_stride, x_ptrs, x_mask, s_ptrs, z_ptrs, n_mask, G, N,
                                4, GROUP, DT, USE_ASM)
    return acc
