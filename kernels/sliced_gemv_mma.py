"""Decode kernel v9: 1..16 fp16 tokens in one program, one slice plane at a time on the tensor cores, from registers.

Shapes and contract as ``sliced_gemv`` (v5): x (M, K) fp16 with M <= 16, k (M,) int32 on the device (clamped to
1..E), packed (layout.py) with N rows and groups of 128, y (M, N) fp16.

Why: v7/v8 (``sliced_gemv_cc``) give each token its own programs, so M tokens unpack the weights M times, and v5
(``sliced_gemv``) runs each group through shared memory and a waited wgmma; at 4 tokens both were slower than
tinygemm, and a mixed batch ran v5's per-slice path at twice the time of uniform k = 4 (KERNEL_NOTES.md). Here the
8 columns of ``mma.sync m16n8k16`` are 8 tokens (two column blocks for 16), so a program unpacks each weight once
for all of them, and every token, whatever its slice count, reads the same plane registers.

Planes, not merged codes: with nested codes Q_k 4^-(k-1) = Σ_{j<=k} r_j 4^(1-j) (r_j the 2-bit code of plane j), so

    x_t Ŵ_{k_t}ᵀ = s_1 (Σ_j f_j(t) R_j + (c_t - z_1) X_t),   R_j = r_j · x_t,   X_t = Σ x_t,
    f_j(t) = 4^(1-j) if k_t >= j else 0,   c_t = 2^-(2 k_t - 1)

per group and row. Each plane's product runs once for all tokens and each token weighs it with its own f_j(t) in
fp32: a mixed batch costs what a uniform batch at its largest k costs, and a plane is read only if a token needs it.

Unpacking a plane word (16 codes, layout.py's slots) takes two shifts and eight LOP3, with no conversion:
    register j = (w' & mask_j) | o_j   = fp16x2 (o_j + r of slot j, o_j + r of slot j + 8)
with w' = w << 4 (j = 0, 1), w (j = 2..4), w >> 6 (j = 5..7), which puts the field at mantissa bit p_j in {4, 6, 8}
of an fp16 whose exponent is o_j = 2^(10 - p_j) in {64, 16, 4}, so the register holds o_j + r exactly (``OFF``).
The offsets are taken out after the products: the mma gives D_j = Σ (o + r_j) x = Off_t + R_j, where
Off_t = Σ o x_t is the same for every row and plane; one more mma per step with a constant A (rows g: the offsets,
rows g + 8: ones) gives Off_t and X_t for the lane's own output columns (no shuffles). Products are exact (fp16 x
fp16 in fp32) and sums fp32; with |o| <= 64 the cancellation (Off_t + R_j) - Off_t costs about 2^-24 x 64 Σ |x|.

The tile is (R, 8, 4) in Triton's default layout (lanes [1, 8, 4], warps along R): lane 4 g + t holds rows
8 r + g (r = its rows of the tile) and the words 2t, 2t + 1 of each group (8-byte loads), which is mma.sync's A
fragment with two of its rows (the pair (r, r') of a pack = 2 instance as the fragment's rows g, g + 8); its B
fragment is token g's x at the same positions (a (1, 8, 4) tensor: every lane loads its token's 64 bytes once), and
its D fragment holds rows (r, r') for tokens 2t, 2t + 1: the outputs are kept as (R, 8, 4) tensors per token parity
and column block. The step per group and plane: 4 words x (2 shifts + 8 LOP3) and 8 mma per 64 weights of a lane.

Grid (cdiv(N, 8 R), SPLIT_K); split-K partials are reduced by the last-arriving program (self-resetting counter
per n-tile), as in v5. Options (config dict, configs/h100.json key "sliced_gemv_mma"): BLOCK_N (= 8 R, a multiple
of 16 x num_warps), SPLIT_K, num_warps, PF (1: the next group's words, scales and zero points loaded one step
ahead), PDL (programmatic dependent launch, as in v7).

The interpreter path (USE_ASM=False) computes each output's group dot directly (fp32, no offsets); the PTX texts are
executed on the CPU, all 32 lanes of a warp with the mma fragments, in tests/kernels/test_sliced_gemv_mma.py.

Status on the H100 (benchmarks/KERNEL_NOTES.md, "Final figures"; group-major layout): 32-layer LLaMA-3-8B stack,
4 tokens 2.227 / 2.589 / 3.106 / 3.738 ms at k = 1..4 and 3.734 mixed (v5: 3.920 / 3.988 / 4.470 / 4.737, mixed
10.863; tinygemm int4 3.208); 16 tokens 3.046 / 3.550 / 4.120 / 4.898, mixed 4.906 (v5 4.631 at k = 4, mixed 10.740;
tinygemm 8.363). At one token
v7 + v8 (``sliced_gemv_cc``) stay faster, so ``dispatch.sliced_linear`` uses this kernel for 2..16 fp16 tokens.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import PackedSlices
from .sliced_gemv import _check_args, _scratch, fill_split_k, split_count
from .sliced_gemv_cc import (
    ASM_GDC_LAUNCH,
    ASM_GDC_WAIT,
    ASM_LDX16,
    I32X16,
    _f16_bits_to_f32,
    _h2,
    _has_pdl,
    _load_sz_mma,
    _load_words_mma,
    l2_prefetch_tile,
)
from .tuning import lookup

MAX_TOKENS_MMA = 16
GROUP_MMA = 128  # the tile's 4 lanes x 2 words x 16 codes
_GROUP = tl.constexpr(GROUP_MMA)
P_BIT = (4, 6, 4, 6, 8, 4, 6, 8)  # mantissa bit of register j's field after its shift
SHIFT = ("shl 4", "shl 4", "", "", "", "shr 6", "shr 6", "shr 6")  # register j's source: w << 4, w, w >> 6
OFF = tuple(2.0 ** (10 - p) for p in P_BIT)  # o_j: register j holds o_j + r


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plane_regs_ptx(word: str, out: str) -> list[str]:
    """PTX: one plane word -> fp16x2 registers ``out``0..7, register j = (OFF[j] + r of slot j, OFF[j] + r of slot
    j + 8). Needs .b32 wl, wr declared (the shifted copies)."""
    L = [f"shl.b32 wl, {word}, 4;", f"shr.u32 wr, {word}, 6;"]
    for j in range(8):
        src = {"shl 4": "wl", "": word, "shr 6": "wr"}[SHIFT[j]]
        p = P_BIT[j]
        mask = (3 << p) | (3 << (p + 16))
        L.append(f"lop3.b32 {out}{j}, {src}, {hex(mask)}, {_h2(OFF[j])}, 0xEA;")  # (a & b) | c
    return L


def asm_plane_text(tb: int) -> str:
    """PTX of one plane's products for ``tb`` column blocks of 8 tokens (pack = 2: elements e0, e1 = two rows).

    Operands: outputs o = 2 b + parity (block b, token 8 b + 2 t + parity) at $(2o) (row e0), $(2o + 1) (row e1);
    then words: chunk 2t of e0, e1 at $(4tb), $(4tb + 1), chunk 2t + 1 at $(4tb + 2), $(4tb + 3); then x pair j
    (j < 8: chunk 2t, else chunk 2t + 1) of block b at $(4tb + 4 + 2 (16 b + j)) (twice, equal). One chain of 8 mma
    per block: step c takes A = {qa[2c], qb[2c], qa[2c+1], qb[2c+1]} (fragment rows g = e0, g + 8 = e1) and
    B = {x pair 2c, x pair 2c + 1} of chunk 2t, then the same with chunk 2t + 1 (two chains added at the end measured
    3-13 % slower: ``benchmarks/experiments/ab_v9_chain.py``). D = Σ (o + r) x over the group, per (row, token)."""
    n_out = 4 * tb
    L = ["{", ".reg .b32 wl, wr;"]
    L += [".reg .b32 " + ", ".join(f"q{w}{j}" for j in range(8)) + ";" for w in "abcd"]
    L += [".reg .f32 " + ", ".join(f"d{b}{i}" for i in range(4)) + ";" for b in range(tb)]
    for w, op in zip("abcd", range(4)):  # a: (e0, chunk 2t), b: (e1, 2t), c: (e0, 2t + 1), d: (e1, 2t + 1)
        L += plane_regs_ptx(f"${n_out + op}", f"q{w}")
    for b in range(tb):
        L += [f"mov.f32 d{b}{i}, 0f00000000;" for i in range(4)]
        x0 = n_out + 4 + 32 * b
        acc = f"{{d{b}0, d{b}1, d{b}2, d{b}3}}"
        for c in range(4):
            for (r0, r1), xo in ((("qa", "qb"), 0), (("qc", "qd"), 8)):
                L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {acc}, "
                         f"{{{r0}{2 * c}, {r1}{2 * c}, {r0}{2 * c + 1}, {r1}{2 * c + 1}}}, "
                         f"{{${x0 + 2 * (xo + 2 * c)}, ${x0 + 2 * (xo + 2 * c + 1)}}}, {acc};")
        for par in range(2):  # D fragment: d0, d1 = row g, tokens 2t, 2t + 1; d2, d3 = row g + 8
            o = 2 * b + par
            L.append(f"mov.f32 ${2 * o}, d{b}{par};")
            L.append(f"mov.f32 ${2 * o + 1}, d{b}{2 + par};")
    L.append("}")
    return "\n".join(L)


def asm_aux_text(tb: int) -> str:
    """PTX (pack = 1, lane 4 g + t: token 8 b + g's x pairs of chunks 2t, 2t + 1 at $(4tb + 16 b + j)) -> per block
    b: Off and X of tokens 8 b + 2t, 8 b + 2t + 1 at $(4b), $(4b + 1) and $(4b + 2), $(4b + 3). A is constant: rows g
    hold the offsets of the plane registers that step c feeds (OFF[2c], OFF[2c + 1]), rows g + 8 ones."""
    n_out = 4 * tb
    L = ["{", ".reg .b32 one, " + ", ".join(f"o{j}" for j in range(8)) + ";",
         ".reg .f32 " + ", ".join(f"d{b}{i}" for b in range(tb) for i in range(4)) + ";",
         f"mov.b32 one, {_h2(1.0)};"]
    L += [f"mov.b32 o{j}, {_h2(OFF[j])};" for j in range(8)]
    for b in range(tb):
        L += [f"mov.f32 d{b}{i}, 0f00000000;" for i in range(4)]
        x0 = n_out + 16 * b
        acc = f"{{d{b}0, d{b}1, d{b}2, d{b}3}}"
        for c in range(4):
            for xo in (0, 8):
                L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {acc}, "
                         f"{{o{2 * c}, one, o{2 * c + 1}, one}}, {{${x0 + xo + 2 * c}, ${x0 + xo + 2 * c + 1}}}, "
                         f"{acc};")
        for i in range(4):  # d0, d1: Off of tokens 2t, 2t + 1 (rows g); d2, d3: X (rows g + 8)
            L.append(f"mov.f32 ${4 * b + i}, d{b}{i};")
    L.append("}")
    return "\n".join(L)


ASM_PLANE_1 = tl.constexpr(asm_plane_text(1))
ASM_PLANE_2 = tl.constexpr(asm_plane_text(2))
ASM_AUX_1 = tl.constexpr(asm_aux_text(1))
ASM_AUX_2 = tl.constexpr(asm_aux_text(2))
PLANE_CONS_1 = tl.constexpr(",".join(["=r"] * 4 + ["r"] * (4 + 32)))
PLANE_CONS_2 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * (4 + 64)))
AUX_CONS_1 = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 16))
AUX_CONS_2 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 32))
F32X4 = tl.constexpr((tl.float32,) * 4)
F32X2 = tl.constexpr((tl.float32,) * 2)


@triton.jit
def _load_x16(xp, USE_ASM: tl.constexpr):
    """The 16 int32 x pairs at xp (valid addresses; any shape): 64 contiguous bytes."""
    if USE_ASM:
        return tl.inline_asm_elementwise(ASM_LDX16, "=r," * 16 + "l", [xp.to(tl.int64, bitcast=True)],
                                         dtype=I32X16, is_pure=True, pack=1)
    return (tl.load(xp), tl.load(xp + 1), tl.load(xp + 2), tl.load(xp + 3), tl.load(xp + 4), tl.load(xp + 5),
            tl.load(xp + 6), tl.load(xp + 7), tl.load(xp + 8), tl.load(xp + 9), tl.load(xp + 10), tl.load(xp + 11),
            tl.load(xp + 12), tl.load(xp + 13), tl.load(xp + 14), tl.load(xp + 15))


@triton.jit
def _xsum_ref(x_ptr, stride_x, g, tok):
    """Interpreter: X = Σ_group x of tokens tok (1, 1, 4), fp32."""
    pos = tl.arange(0, _GROUP)[None, None, None, :]
    return tl.sum(tl.load(x_ptr + tok[:, :, :, None] * stride_x + g * _GROUP + pos).to(tl.float32), axis=3)


@triton.jit
def _aux(xs0, xs1, x_ptr, stride_x, g, tk0, tk1, tk2, tk3, TB: tl.constexpr, USE_ASM: tl.constexpr):
    """Off and X of the outputs' tokens: (Off_0, Off_1, Off_2, Off_3, X_0, ..., X_3), (1, 8, 4) or (1, 1, 4) fp32.
    PTX: the aux mma on the lane's x pairs xs0 (block 0), xs1 (block 1); interpreter: Off = 0 (no offsets there)."""
    if USE_ASM:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = xs0
        if TB == 1:
            o0, o1, X0, X1 = tl.inline_asm_elementwise(
                ASM_AUX_1, AUX_CONS_1, [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15],
                dtype=F32X4, is_pure=True, pack=1)
            return o0, o1, o0, o1, X0, X1, X0, X1
        else:
            y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = xs1
            o0, o1, X0, X1, o2, o3, X2, X3 = tl.inline_asm_elementwise(
                ASM_AUX_2, AUX_CONS_2, [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                                        y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            return o0, o1, o2, o3, X0, X1, X2, X3
    else:
        zero = tl.zeros((1, 1, 4), tl.float32)
        X0 = _xsum_ref(x_ptr, stride_x, g, tk0)
        X1 = _xsum_ref(x_ptr, stride_x, g, tk1)
        X2, X3 = X0, X1
        if TB == 2:
            X2 = _xsum_ref(x_ptr, stride_x, g, tk2)
            X3 = _xsum_ref(x_ptr, stride_x, g, tk3)
        return zero, zero, zero, zero, X0, X1, X2, X3


@triton.jit
def _plane_ref(w_grp, off, x_ptr, stride_x, g, tok):
    """Interpreter: Σ_group r x for rows w_grp (R, 8, 1) (word 0 of group g; plane at word offset off) and tokens
    tok (1, 1, 4)."""
    pos = tl.arange(0, _GROUP)[None, None, None, :]
    word = tl.load(w_grp[:, :, :, None] + off + pos // 16)  # (R, 8, 1, 128)
    slot = (pos % 16) // 2 + 8 * (pos % 2)  # layout.SLOT: position 2j <- slot j, 2j + 1 <- slot j + 8
    r = ((word >> (2 * slot)) & 3).to(tl.float32)
    xv = tl.load(x_ptr + tok[:, :, :, None] * stride_x + g * _GROUP + pos).to(tl.float32)  # (1, 1, 4, 128)
    return tl.sum(r * xv, axis=3)


@triton.jit
def _plane(wa, wb, xs0, xs1, w_grp, off, x_ptr, stride_x, g, tk0, tk1, tk2, tk3, TB: tl.constexpr,
           USE_ASM: tl.constexpr):
    """D = Σ_group (o + r) x of one plane for each output, 4 x (R, 8, 4) fp32 (TB = 1: outputs 2, 3 repeat 0, 1).
    wa, wb: the plane's words 2t, 2t + 1 (R, 8, 4); PTX ``asm_plane_text``; interpreter ``_plane_ref``."""
    if USE_ASM:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = xs0
        if TB == 1:
            d0, d1 = tl.inline_asm_elementwise(
                ASM_PLANE_1, PLANE_CONS_1,
                [wa, wb, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15],
                dtype=F32X2, is_pure=True, pack=2)
            return d0, d1, d0, d1
        else:
            y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = xs1
            return tl.inline_asm_elementwise(
                ASM_PLANE_2, PLANE_CONS_2,
                [wa, wb, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                 y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15],
                dtype=F32X4, is_pure=True, pack=2)
    else:
        d0 = _plane_ref(w_grp, off, x_ptr, stride_x, g, tk0)
        d1 = _plane_ref(w_grp, off, x_ptr, stride_x, g, tk1)
        d2, d3 = d0, d1
        if TB == 2:
            d2 = _plane_ref(w_grp, off, x_ptr, stride_x, g, tk2)
            d3 = _plane_ref(w_grp, off, x_ptr, stride_x, g, tk3)
        return d0, d1, d2, d3


@triton.jit
def _weigh(P0, P1, P2, P3, D0, D1, D2, D3, f0, f1, f2, f3):
    """P_o + f_o D_o: one plane's products weighed by each output's token factor f_j(t) (0 below the token's k)."""
    return P0 + f0 * D0, P1 + f1 * D1, P2 + f2 * D2, P3 + f3 * D3


@triton.jit
def _token_consts(k_ptr, tok, E: tl.constexpr):
    """Per output token tok (1, 1, 4), a valid index: (f_2, f_3, f_4, F = Σ_j f_j, c = 2^-(2k-1)) fp32, k clamped
    to 1..E."""
    kk = tl.minimum(tl.maximum(tl.load(k_ptr + tok), 1), E)
    f2 = tl.where(kk >= 2, 0.25, 0.0)
    f3 = tl.where(kk >= 3, 0.0625, 0.0)
    f4 = tl.where(kk >= 4, 0.015625, 0.0)
    c = tl.where(kk == 1, 0.5, tl.where(kk == 2, 0.125, tl.where(kk == 3, 0.03125, 0.0078125)))
    return f2, f3, f4, 1.0 + f2 + f3 + f4, c


@triton.jit
def _mma9_loop(w_rowt, w_row, xb0, xb1, s_row, z_row, g_lo, g_hi, N, plane_stride, x_ptr, stride_x,
               tk0, tk1, tk2, tk3, fk0, fk1, fk2, fk3, KS: tl.constexpr, TB: tl.constexpr, USE_ASM: tl.constexpr,
               PF: tl.constexpr):
    """Per output o (tokens tk_o (1, 1, 4): block o // 2, parity o % 2), (R, 8, 4) fp32: Σ over the groups
    [g_lo, g_hi) of s_1 (Σ_{j <= KS} f_j D_j - F Off + c X) - s_1 z_1 X (fk_o = _token_consts of tk_o)."""
    R: tl.constexpr = w_rowt.shape[0]
    acc0 = tl.zeros((R, 8, 4), tl.float32)
    acc1 = tl.zeros((R, 8, 4), tl.float32)
    acc2 = tl.zeros((R, 8, 4), tl.float32)
    acc3 = tl.zeros((R, 8, 4), tl.float32)
    f2_0, f3_0, f4_0, F_0, c_0 = fk0
    f2_1, f3_1, f4_1, F_1, c_1 = fk1
    f2_2, f3_2, f4_2, F_2, c_2 = fk2
    f2_3, f3_3, f4_3, F_3, c_3 = fk3
    GS = N * 8  # group-major words: group g at + g GS
    if PF:
        v = _load_words_mma(w_rowt + g_lo * GS, plane_stride, KS, USE_ASM)
        sv, zv = _load_sz_mma(s_row + g_lo * N, z_row + g_lo * N, USE_ASM)
    for g in range(g_lo, g_hi):
        if PF:  # this group's words, s and z were issued one step ahead; the next group's now (past the end: the
            w, s, z = v, sv, zv  # last group again, a valid address)
            gn = tl.minimum(g + 1, g_hi - 1)
            v = _load_words_mma(w_rowt + gn * GS, plane_stride, KS, USE_ASM)
            sv, zv = _load_sz_mma(s_row + gn * N, z_row + gn * N, USE_ASM)
        else:
            w = _load_words_mma(w_rowt + g * GS, plane_stride, KS, USE_ASM)
            s, z = _load_sz_mma(s_row + g * N, z_row + g * N, USE_ASM)
        a0, b0, a1, b1, a2, b2, a3, b3 = w
        w_grp = w_row + g * GS  # (interpreter path)
        if USE_ASM:
            xs0 = _load_x16(xb0 + g * 64, USE_ASM)
            xs1 = xs0
            if TB == 2:
                xs1 = _load_x16(xb1 + g * 64, USE_ASM)
        else:
            xs0 = xb0
            xs1 = xb0
        O0, O1, O2, O3, X0, X1, X2, X3 = _aux(xs0, xs1, x_ptr, stride_x, g, tk0, tk1, tk2, tk3, TB, USE_ASM)
        P0, P1, P2, P3 = _plane(a0, b0, xs0, xs1, w_grp, 0, x_ptr, stride_x, g, tk0, tk1, tk2, tk3, TB, USE_ASM)
        if KS > 1:
            D0, D1, D2, D3 = _plane(a1, b1, xs0, xs1, w_grp, plane_stride, x_ptr, stride_x, g, tk0, tk1, tk2, tk3,
                                    TB, USE_ASM)
            P0, P1, P2, P3 = _weigh(P0, P1, P2, P3, D0, D1, D2, D3, f2_0, f2_1, f2_2, f2_3)
        if KS > 2:
            D0, D1, D2, D3 = _plane(a2, b2, xs0, xs1, w_grp, 2 * plane_stride, x_ptr, stride_x, g, tk0, tk1, tk2,
                                    tk3, TB, USE_ASM)
            P0, P1, P2, P3 = _weigh(P0, P1, P2, P3, D0, D1, D2, D3, f3_0, f3_1, f3_2, f3_3)
        if KS > 3:
            D0, D1, D2, D3 = _plane(a3, b3, xs0, xs1, w_grp, 3 * plane_stride, x_ptr, stride_x, g, tk0, tk1, tk2,
                                    tk3, TB, USE_ASM)
            P0, P1, P2, P3 = _weigh(P0, P1, P2, P3, D0, D1, D2, D3, f4_0, f4_1, f4_2, f4_3)
        sf = _f16_bits_to_f32(s, USE_ASM)  # (R, 8, 1)
        sz = sf * _f16_bits_to_f32(z, USE_ASM)
        acc0 += sf * (P0 + (c_0 * X0 - F_0 * O0)) - sz * X0
        acc1 += sf * (P1 + (c_1 * X1 - F_1 * O1)) - sz * X1
        if TB == 2:
            acc2 += sf * (P2 + (c_2 * X2 - F_2 * O2)) - sz * X2
            acc3 += sf * (P3 + (c_3 * X3 - F_3 * O3)) - sz * X3
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_out(y_ptr, stride_ym, acc, tok, n, n_mask, M, ws, tile_ws, pid_k, SPLIT_K: tl.constexpr,
               BLOCK_N: tl.constexpr, loc):
    """SPLIT_K = 1: y[tok, n] = acc; else the partial to the workspace slot (tile, split, tok)."""
    if SPLIT_K == 1:
        tl.store(y_ptr + tok * stride_ym + n, acc.to(tl.float16), mask=n_mask & (tok < M))
    else:
        tl.store(ws + ((tile_ws + pid_k) * 16 + tok) * BLOCK_N + loc, acc)


@triton.jit
def _reduce_out(y_ptr, stride_ym, tok, n, n_mask, M, ws, tile_ws, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                loc):
    """The last split: y[tok, n] = Σ_splits of the workspace partials."""
    tot = tl.zeros(loc.shape, tl.float32) + tl.zeros(tok.shape, tl.float32)
    for sp in range(SPLIT_K):
        tot += tl.load(ws + ((tile_ws + sp) * 16 + tok) * BLOCK_N + loc, cache_modifier=".cg")
    tl.store(y_ptr + tok * stride_ym + n, tot.to(tl.float16), mask=n_mask & (tok < M))


@triton.jit
def _sliced_gemv_mma_kernel(
    x_ptr, xi_ptr, y_ptr, k_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, cnt_ptr,
    M, N, G, stride_xm, stride_xim, stride_ym, plane_stride,
    E: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, TB: tl.constexpr, USE_ASM: tl.constexpr,
    PF: tl.constexpr, PDL: tl.constexpr,
):
    """x_ptr: x (M, K) fp16 (interpreter path); xi_ptr: the same memory as int32 pairs (M, K/2), stride_xim in int32
    units. One program: rows [pid_n BLOCK_N, +BLOCK_N) of every token, groups of split pid_k."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    R: tl.constexpr = BLOCK_N // 8
    WPG: tl.constexpr = _GROUP // 16
    i_r = tl.arange(0, R)[:, None, None]
    i_g = tl.arange(0, 8)[None, :, None]
    i_t = tl.arange(0, 4)[None, None, :]
    loc = 8 * i_r + i_g  # (R, 8, 1): row within the tile
    n = pid_n * BLOCK_N + loc
    n_mask = n < N
    n_c = tl.minimum(n, N - 1)  # rows past N read row N - 1 (never stored)
    gps = tl.cdiv(G, SPLIT_K)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, G)
    w_row = w_ptr + n_c * WPG  # (R, 8, 1) plane 1, group 0 (group-major words)
    w_rowt = w_row + 2 * i_t  # (R, 8, 4): words 2t, 2t + 1 of group 0
    s_row = s_ptr + n_c
    z_row = z_ptr + n_c
    if PDL:  # before the wait only the weights (never written by a kernel) are touched: plane 1 into L2
        l2_prefetch_tile(w_ptr, pid_n * BLOCK_N, N, g_lo, g_hi, BLOCK_N, WPG)
        one = tl.full((1,), 0, tl.int32)
        tl.inline_asm_elementwise(ASM_GDC_LAUNCH, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise(ASM_GDC_WAIT, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
    # the lane's x: token g (block 0) and 8 + g (block 1), pairs 16 t .. 16 t + 15 of group 0 (past M: token M - 1)
    xb0 = xi_ptr + tl.minimum(i_g, M - 1) * stride_xim + 16 * i_t  # (1, 8, 4)
    xb1 = xi_ptr + tl.minimum(i_g + 8, M - 1) * stride_xim + 16 * i_t
    # the outputs' tokens: o = 2 b + parity holds token 8 b + 2 t + parity
    tk0 = 2 * i_t
    tk1 = 2 * i_t + 1
    tk2 = 8 + 2 * i_t
    tk3 = 9 + 2 * i_t
    tc0 = tl.minimum(tk0, M - 1)
    tc1 = tl.minimum(tk1, M - 1)
    tc2 = tl.minimum(tk2, M - 1)
    tc3 = tl.minimum(tk3, M - 1)
    fk0 = _token_consts(k_ptr, tc0, E)
    fk1 = _token_consts(k_ptr, tc1, E)
    fk2 = _token_consts(k_ptr, tc2, E)
    fk3 = _token_consts(k_ptr, tc3, E)
    i_m = tl.arange(0, 16)
    kmax = tl.max(tl.minimum(tl.maximum(tl.load(k_ptr + i_m, mask=i_m < M, other=1), 1), E), axis=0)
    acc0 = tl.zeros((R, 8, 4), tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    if kmax == 1:
        acc0, acc1, acc2, acc3 = _mma9_loop(w_rowt, w_row, xb0, xb1, s_row, z_row, g_lo, g_hi, N, plane_stride,
                                            x_ptr, stride_xm, tc0, tc1, tc2, tc3, fk0, fk1, fk2, fk3, 1, TB,
                                            USE_ASM, PF)
    elif kmax == 2:
        if E >= 2:
            acc0, acc1, acc2, acc3 = _mma9_loop(w_rowt, w_row, xb0, xb1, s_row, z_row, g_lo, g_hi, N,
                                                plane_stride, x_ptr, stride_xm, tc0, tc1, tc2, tc3, fk0, fk1, fk2,
                                                fk3, 2, TB, USE_ASM, PF)
    elif kmax == 3:
        if E >= 3:
            acc0, acc1, acc2, acc3 = _mma9_loop(w_rowt, w_row, xb0, xb1, s_row, z_row, g_lo, g_hi, N,
                                                plane_stride, x_ptr, stride_xm, tc0, tc1, tc2, tc3, fk0, fk1, fk2,
                                                fk3, 3, TB, USE_ASM, PF)
    else:
        if E >= 4:
            acc0, acc1, acc2, acc3 = _mma9_loop(w_rowt, w_row, xb0, xb1, s_row, z_row, g_lo, g_hi, N,
                                                plane_stride, x_ptr, stride_xm, tc0, tc1, tc2, tc3, fk0, fk1, fk2,
                                                fk3, 4, TB, USE_ASM, PF)
    tile_ws = pid_n * SPLIT_K
    _store_out(y_ptr, stride_ym, acc0, tk0, n, n_mask, M, ws_ptr, tile_ws, pid_k, SPLIT_K, BLOCK_N, loc)
    _store_out(y_ptr, stride_ym, acc1, tk1, n, n_mask, M, ws_ptr, tile_ws, pid_k, SPLIT_K, BLOCK_N, loc)
    if TB == 2:
        _store_out(y_ptr, stride_ym, acc2, tk2, n, n_mask, M, ws_ptr, tile_ws, pid_k, SPLIT_K, BLOCK_N, loc)
        _store_out(y_ptr, stride_ym, acc3, tk3, n, n_mask, M, ws_ptr, tile_ws, pid_k, SPLIT_K, BLOCK_N, loc)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partial is written before the counter is released
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last split of this tile: reduce and reset the counter
            _reduce_out(y_ptr, stride_ym, tk0, n, n_mask, M, ws_ptr, tile_ws, SPLIT_K, BLOCK_N, loc)
            _reduce_out(y_ptr, stride_ym, tk1, n, n_mask, M, ws_ptr, tile_ws, SPLIT_K, BLOCK_N, loc)
            if TB == 2:
                _reduce_out(y_ptr, stride_ym, tk2, n, n_mask, M, ws_ptr, tile_ws, SPLIT_K, BLOCK_N, loc)
                _reduce_out(y_ptr, stride_ym, tk3, n, n_mask, M, ws_ptr, tile_ws, SPLIT_K, BLOCK_N, loc)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


def default_config_mma(M: int, N: int, K: int) -> dict:
    """Heuristic when no tuned entry exists: BLOCK_N 64 on 4 warps (one pack = 2 instance per lane), split-K until
    >= 448 programs with >= 2 groups per split, next group prefetched."""
    bn = 64
    return dict(BLOCK_N=bn, SPLIT_K=fill_split_k(triton.cdiv(N, bn), K // GROUP_MMA), num_warps=4, PF=1, PDL=1)


def sliced_gemv_mma(x: torch.Tensor, packed: PackedSlices, k: torch.Tensor, out: torch.Tensor | None = None,
                    config: dict | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · Ŵ_{k_t}ᵀ per token t, for M <= 16 fp16 tokens and groups of 128 (v9). k: (M,) int32.

    ``config`` overrides the tuned one (BLOCK_N = 8 R with R a multiple of 2 x num_warps, SPLIT_K, num_warps, PF,
    PDL); ``use_asm`` the PTX (default: on unless TRITON_INTERPRET=1). ``out`` may be given (M, N), e.g. for graph
    capture."""
    x, M, N, K = _check_args(x, packed, k)
    if M > MAX_TOKENS_MMA:
        raise ValueError(f"sliced_gemv_mma takes 1..{MAX_TOKENS_MMA} tokens, got {M} (use sliced_gemm)")
    if x.dtype != torch.float16:
        raise TypeError(f"sliced_gemv_mma takes fp16 x, got {x.dtype} (use sliced_gemv)")
    if packed.group_size != GROUP_MMA:
        raise ValueError(f"sliced_gemv_mma takes groups of {GROUP_MMA}, got {packed.group_size} (use sliced_gemv)")
    use_asm = (not _interpret()) if use_asm is None else use_asm
    cfg = config or lookup("sliced_gemv_mma", M, N, K) or default_config_mma(M, N, K)
    BN, W = cfg["BLOCK_N"], cfg.get("num_warps", 4)
    if BN % (16 * W):
        raise ValueError(f"BLOCK_N={BN} must be a multiple of 16 x num_warps={W}")
    G = K // GROUP_MMA
    SK = split_count(G, cfg.get("SPLIT_K", 1))
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    n_tiles = triton.cdiv(N, BN)
    ws, cnt = _scratch(x.device, n_tiles * SK * 16 * BN if SK > 1 else 1, n_tiles)
    xi = x.view(torch.int32)  # (M, K/2) fp16 pairs
    pdl = bool(cfg.get("PDL", 0)) and use_asm and _has_pdl()
    _sliced_gemv_mma_kernel[(n_tiles, SK)](
        x, xi, y, k, packed.qweight, packed.scale, packed.zero, ws, cnt,
        M, N, G, x.stride(0), xi.stride(0), y.stride(0), packed.qweight[0].numel(),
        E=packed.num_slices, BLOCK_N=BN, SPLIT_K=SK, TB=1 if M <= 8 else 2, USE_ASM=use_asm,
        PF=cfg.get("PF", 1), PDL=pdl, num_warps=W, num_stages=1,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y


__all__ = ["sliced_gemv_mma", "default_config_mma", "MAX_TOKENS_MMA", "asm_plane_text", "asm_aux_text",
           "plane_regs_ptx", "OFF"]
