"""Decode kernel v7: a CUDA-core GEMV for 1..4 tokens (no tensor cores, no shared-memory round trip).

Shapes and contract as ``sliced_gemv`` (v5): x (M, K) fp16 with M <= 4, k (M,) int32 on the device (clamped to
1..E), packed (layout.py) with N rows, y (M, N) fp16. bf16 is not supported here (the fp16x2 products below would
run in bf16's 8-bit mantissa); ``dispatch.sliced_linear`` keeps bf16 on v5.

Why: v5 runs each group as unpack -> shared memory -> barrier -> wgmma -> wait -> epilogue, a serial chain of about
1 µs per CTA and group, so at batch 1 it is latency-bound (KERNEL_NOTES.md). Here every thread unpacks its own words
and multiplies them with x in registers, with packed fp16x2 math; nothing waits on anything but its loads.

Per int32 word (16 weights of one row, the same 16 positions in each of the k planes), one inline-PTX block:

    merge the k plane words into 2-, 4- or 8-bit fields Q_k (_tile.merge_planes_ptx; register j: slots j, j + 8,
        which layout.SLOT puts at positions 2j and 2j + 1 of the word: x pairs load as plain int32)
    per register j: r = (u & mask(p)) | magic(p)      the field at mantissa bit p of an fp16 whose exponent is
                                                      2^(10 - p): r = 2^(10 - p) + Q exactly (a shift only when
                                                      the field lies above bit 10 - bits)
                    q = fma.f16x2(r, c1, c2(p))       q = Q 4^-(k-1) / 16 - 1/8, exact, |q| <= 1/8
                    acc = fma.f16x2(q, x_j, acc)      two chains (even / odd j) of 4 products, then added:
                                                      8 products per fp16 half
    P = cvt.f32(acc.lo) + cvt.f32(acc.hi)

Overflow guard: |q| <= 1/8 and 8 products per fp16 accumulator give |acc| <= 8 * 65504 / 8, so no finite fp16 x
can overflow it (round-to-nearest never rounds a value <= 65504 up to inf). The x sums are taken the same way,
as Σ x / 16 in fp16x2 (8 terms of |x| / 16 per half). Products below 2^-14 (|q x| tiny) lose relative precision
(fp16 subnormals), which is negligible against the output unless the whole of x is below ~1e-3.

Epilogue per word and row, in fp32 (s_1, z_1 of the row's group, X = Σ_word x / 16):
    Ŵ_k = s_1 (16 q + 2 - z_1 + 2^-(2k-1))  =>  acc32 += s_1 P + s_1 (2 - z_1 + 2^-(2k-1)) X      (times 16 at the end)

Grid (cdiv(N, BLOCK_N), SPLIT_K, M): one token per program (its own k_t, so mixed batches need no masking); the
other tokens' programs read the same words, mostly from L2. Split-K partials are reduced by the last-arriving
program (self-resetting counter per token and n-tile), as in v5.

Several weights of one input (q/k/v, gate/up; up to 3, same K, slices and group size) can share one launch: their
n-tiles follow each other along grid axis 0, each program picks its weight's pointers, row count and slice count
(k (M, S): token m of weight s at k[m, s]) and writes its rows at the weight's offset in y (M, N_1 + N_2 + ...).
This saves the fixed cost of the separate launches (KERNEL_NOTES.md, "decode step").

Tensor cores from registers (config MMA, a bitmask: bit k - 1 puts slice count k there; group 128, BLOCK_N a
multiple of 16 x num_warps, else ignored): the same q per register, but the products and sums run as mma.sync
m16n8k16 on fragments the unpacking leaves in registers (no shared memory). The (BLOCK_N, 4) tile's default layout
gives lane 4 g + t chunks (words) 2t, 2t + 1 of two rows shared by its quad, which is mma.sync's A fragment with the
group's 128 weights as the quad's 16 columns over 8 mmas; x fills B (every column the same token). Fewer
instructions per weight than the CUDA-core dot (SASS, KERNEL_NOTES.md "v8"): 2.1 / 2.5 / 3.7 / 4.3 at k = 1..4
against 2.7 / 3.1 / 4.5 / 4.9, sums in fp32.

Launch options (config dict, tuned per shape in configs/h100.json): BLOCK_N, GPI (groups per iteration), SPLIT_K,
SPLIT_K12 (fewer splits for tokens at k <= 2, chosen on the device from k: the grid keeps SPLIT_K programs per tile
and those past SPLIT_K12 return at once; the gate/up launch is faster at every k but 3 with 8 / 4 than with 4),
num_warps, PF (1: prefetch the next iteration's words, scales and zero points into registers; 2: the loop unrolled by
two with two register sets, so that no loaded register is copied on the back edge, see ``_cc_loop``), GPK (4 / 2 x GPI
groups per iteration at k = 1 / 2), PDL (programmatic dependent launch: before ``griddepcontrol.wait`` a program only
prefetches its plane-1 weights into L2; x, k, y and the split-K workspace are touched after it), MMA, maxnreg. Three
more options were measured and removed: a bulk L2 prefetch of every plane of the program's rows at its start (slower
at k = 1, 2, KERNEL_NOTES.md "v7"; removed with the group-major layout, code in commit 3ab4381); x of the next step
prefetched (slower except in the fused q/k/v launch alone, and slower there, with PF = 2, in the decode chain); the
first step's loads issued before the PDL wait (slower at every k; these two: "v7 profile", code in commit 970f493).
RING (a bitmask like MMA; tensor-core paths only): slice count k streams its words, s_1 and z_1 through a
shared-memory ring filled by bulk copies (bulk_ring.py, ``_ring_loop``) instead of register loads, same arithmetic,
same output; RCAP caps its stages (default: as many as fit, 2 at BLOCK_N 128); REARLY (with RING at every k and
SPLIT_K12 = SPLIT_K) issues the first stages' plane 1, s and z before the PDL wait and loads the first activations
before k (KERNEL_NOTES.md, "Thirteenth session": the int8 path's configs use it).
The q/k/v launch of a decode step can end with the rotary (``rope=``): each tile's last split rotates its heads
into q and the key / value caches (``_rope_tile``), so the rotary kernel is not launched (KERNEL_NOTES.md,
"Fifteenth session").
Scales and zero points are loaded as raw 16-bit values and converted where they are used (KERNEL_NOTES.md, "v7
profile": a conversion next to the load made every prefetch of them wait for its own load).

The interpreter path (USE_ASM=False) computes P from the same q values in fp32 (tests/kernels check the indexing
and the epilogue there; tests/kernels/test_sliced_gemv_cc.py executes the PTX text itself on the CPU, fp16 rounding
included).

Int8 activations (``x_int8=``, v10, an option: other numerics): x rounded to int8 per group of 128 by
act_int8.py (or by the router launch before this one), and every slice count on mma.sync m16n8k32 u8 x s8 with the
codes as bytes: one AND per four weights at k = 1, sums exact in s32 (``asm_mma8_text``, ``_mma8_loop``). 1.10 /
1.46 / 2.32 / 2.95 SASS per weight at k = 1..4.

Status on the H100 (benchmarks/KERNEL_NOTES.md, "Eleventh session", "Thirteenth session"): 32-layer LLaMA-3-8B
stack at batch 1 in the group-major layout, q/k/v and gate/up as one launch each, 1.513 / 1.798 / 2.408 / 2.949 ms
at k = 1..4 with the tuned configs (43 / 68 / 75 / 81 % of copy bandwidth), and 1.073 / 1.594 / 2.228 / 2.885 ms with
int8 activations on the ring (61 / 77 / 81 / 83 %). Slower than v5 at 4 tokens, so ``dispatch.sliced_linear`` uses
it for one fp16 token only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._tile import load_planes, merge_planes_ptx
from .act_int8 import byte_cols, check_x_int8, xdest
from .bulk_ring import ring_base, ring_init, ring_issue, ring_stages, ring_sz, ring_wait, ring_words
from .decode_step import (
    ASM_GDC_LAUNCH,
    ASM_GDC_WAIT,
    _pdl_launch,
    _sm90,
    norm_fold_fc1,
    norm_fold_tile,
    rope_kv,
    rope_term,
)
from .layout import PackedSlices
from .router import FOLD_GROUP, NormFold, RoutePlan, route_finish
from .sliced_gemv import _check_args, _scratch, fill_split_k, split_count
from .tuning import lookup

MAX_TOKENS_CC = 4
_F16 = {1024.0: 0x6400, 256.0: 0x5C00, 64.0: 0x5400, 16.0: 0x4C00, 4.0: 0x4400, 1.0: 0x3C00}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _h2(v: float) -> str:
    """fp16x2 constant (both halves v) as a PTX hex literal."""
    import struct

    h = struct.unpack("<H", struct.pack("<e", v))[0]
    return hex(h | (h << 16))


def q_regs_ptx(ks: int, words: list[str], out: str, tmp: str = "s") -> list[str]:
    """PTX: the k plane words ``words`` (plane 1 first) -> eight fp16x2 registers ``out``0..7 of q = Q 4^-(k-1)/16
    - 1/8 (register j: slots j, j + 8). Needs t, u0..u3, r, c, c1 declared and c1 set; shifted copies of a source go
    to ``tmp``0.. (declared by the caller, at most 4)."""
    L, regs = merge_planes_ptx(ks, words)
    c1 = 2.0 ** -(2 * ks + 2)
    shifted = {}
    for j, (src, p, b) in enumerate(regs):
        if p + b > 10:  # field above the mantissa: shift it down (one shift per source and amount, reused)
            sh = p if b > 2 else 10  # k=1: slots 5..7 -> bits 0, 2, 4; wider fields: to bit 0 or 4
            if b == 4:
                sh = 8
            key = (src, sh)
            if key not in shifted:
                reg = f"{tmp}{len(shifted)}"
                L.append(f"shr.u32 {reg}, {src}, {sh};")
                shifted[key] = reg
            src, p = shifted[key], p - sh
        magic = 2.0 ** (10 - p)
        mask = ((1 << b) - 1) << p
        L.append(f"lop3.b32 r, {src}, {hex(mask | (mask << 16))}, {_h2(magic)}, 0xEA;")  # (a & b) | c
        L.append(f"mov.b32 c, {_h2(-magic * c1 - 0.125)};")  # f16x2 operands must be registers
        L.append(f"fma.rn.f16x2 {out}{j}, r, c1, c;")  # Q 4^-(k-1)/16 - 1/8, exact
    return L


def asm_cc_text(ks: int) -> str:
    """PTX: plane words $9..$(8+ks) and x pairs $1..$8 (fp16x2 of positions 2j, 2j+1) -> $0 = P (fp32)."""
    L = ["{", ".reg .b32 t, u0, u1, u2, u3, r, c, c1, a, b, s0, s1, s2, s3, q0, q1, q2, q3, q4, q5, q6, q7;",
         ".reg .b16 h0, h1;", ".reg .f32 f0, f1;", f"mov.b32 c1, {_h2(2.0 ** -(2 * ks + 2))};"]
    L += q_regs_ptx(ks, [f"${9 + e}" for e in range(ks)], "q")
    for j in range(8):  # two chains (even / odd j) of 4 products: half the latency
        acc = "a" if j % 2 == 0 else "b"
        L.append(f"mul.rn.f16x2 {acc}, q{j}, ${1 + j};" if j < 2 else f"fma.rn.f16x2 {acc}, q{j}, ${1 + j}, {acc};")
    L += ["add.rn.f16x2 a, a, b;", "mov.b32 {h0, h1}, a;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;",
          "add.f32 $0, f0, f1;", "}"]
    return "\n".join(L)


def asm_mma_text(ks: int) -> str:
    """PTX for the tensor-core path (pack = 2; mma.sync m16n8k16, the products of q and x on the tensor cores).

    One instance holds two elements of a lane: rows e0, e1 (shared by the lane's quad, lanes 4 g + t, t = 0..3) at
    chunks a = 2t and b = 2t + 1 of one group (a chunk = one word = 16 weights, so the quad covers the group's 8).
    Operands: $0, $1 = P of e0, e1 (fp32); plane e: word a $(2 + 4e) (e0), $(3 + 4e) (e1), word b $(4 + 4e),
    $(5 + 4e); x pair j (j < 8: chunk a, j >= 8: chunk b) $(2 + 4ks + 2j) (twice, equal). mma c of chain A takes
    A = {q_e0a[2c], q_e1a[2c], q_e0a[2c+1], q_e1a[2c+1]} (tile row g = e0, g + 8 = e1; tile columns 2t, 2t+1 = slots
    (2c, 2c+8) of the lane's chunk, 2t+8, 2t+9 = slots (2c+1, 2c+9)) and B = {x pair 2c, x pair 2c+1} of chunk a, the
    same in every column; chain B the same with chunk b. D row g sums the quad's chunks, so chains A and B together
    give row e0's whole group; each of the four lanes returns a quarter of it (the caller sums over lanes). Products
    are exact, sums fp32 (|q| <= 1/8; no fp16 accumulation as in the CUDA-core path)."""
    L = ["{", ".reg .b32 t, u0, u1, u2, u3, r, c, c1, s0, s1, s2, s3;"]
    L += [".reg .b32 " + ", ".join(f"q{w}{j}" for j in range(8)) + ";" for w in "abcd"]
    L += [".reg .f32 d0, d1, d2, d3, e0, e1, e2, e3;", f"mov.b32 c1, {_h2(2.0 ** -(2 * ks + 2))};"]
    for w, off in zip("abcd", (2, 3, 4, 5)):  # a: (e0, chunk a), b: (e1, a), c: (e0, chunk b), d: (e1, b)
        L += q_regs_ptx(ks, [f"${off + 4 * e}" for e in range(ks)], f"q{w}")
    L += [f"mov.f32 {r}, 0f00000000;" for r in ("d0", "d1", "d2", "d3", "e0", "e1", "e2", "e3")]
    x0 = 2 + 4 * ks
    for c in range(4):
        for d, (r0, r1), xo in (("d", ("qa", "qb"), 0), ("e", ("qc", "qd"), 8)):
            acc = f"{{{d}0, {d}1, {d}2, {d}3}}"
            L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {acc}, "
                     f"{{{r0}{2 * c}, {r1}{2 * c}, {r0}{2 * c + 1}, {r1}{2 * c + 1}}}, "
                     f"{{${x0 + 2 * (xo + 2 * c)}, ${x0 + 2 * (xo + 2 * c + 1)}}}, {acc};")
    L += ["add.f32 d0, d0, e0;", "add.f32 d2, d2, e2;",
          "mul.f32 $0, d0, 0f3E800000;", "mul.f32 $1, d2, 0f3E800000;", "}"]  # a quarter each
    return "\n".join(L)


# int8 path: per k, how the four byte registers R_j of a word are scaled (R_j holds 2^(2j) Q at k = 1, 16 Q at k = 2
# for j >= 2; the combination Σ_j MUL8[k][j] D_j = DEN8[k] Σ x Q undoes it in integers)
MUL8 = {1: (64, 16, 4, 1), 2: (16, 16, 1, 1), 3: (1, 1, 1, 1), 4: (1, 1, 1, 1)}
DEN8 = {1: 64, 2: 16, 3: 1, 4: 1}


def q_bytes_ptx(ks: int, words: list[str], out: str) -> list[str]:
    """PTX: the k plane words ``words`` (plane 1 first) -> four registers ``out``0..3 whose byte b holds Q_k of slot
    4 b + j (register j), times 4^j at k = 1 (the masks need no shift) and times 16 for j >= 2 at k = 2 (the high
    nibbles left in place): unsigned, at most 255. Needs t, u0..u3 declared."""
    if ks == 1:
        return [f"and.b32 {out}{j}, {words[0]}, {hex(0x03030303 << 2 * j)};" for j in range(4)]
    L, _ = merge_planes_ptx(ks, words)
    if ks == 2:  # nibble n of u_m = Q_2 of slot 2 n + m: low nibbles slots 4 b + m, high nibbles 4 b + 2 + m
        return L + [f"and.b32 {out}{j}, u{j % 2}, {'0x0F0F0F0F' if j < 2 else '0xF0F0F0F0'};" for j in range(4)]
    return L + [f"mov.b32 {out}{j}, u{j};" for j in range(4)]  # byte b of u_m = Q_k of slot 4 b + m


def asm_mma8_text(ks: int) -> str:
    """PTX for the int8 tensor-core path (pack = 2; mma.sync m16n8k32 u8 x s8 -> s32, exact integer sums).

    Operands as ``asm_mma_text`` for the words ($0, $1 = outputs of rows e0, e1; plane e: $(2 + 4e) e0 chunk a,
    $(3 + 4e) e1 a, $(4 + 4e) e0 b, $(5 + 4e) e1 b, chunks a = 2t, b = 2t + 1); then the activations: int32 word j
    of chunk a at $(2 + 4ks + 2j), of chunk b at $(2 + 4ks + 2(4 + j)) (twice each, equal; act_int8's byte order:
    byte b of word j = slot 4 b + j). mma j takes A = {R_j(e0, a), R_j(e1, a), R_j(e0, b), R_j(e1, b)} (rows g, g + 8;
    columns 4t..4t+3 = chunk a, 16 + 4t.. = chunk b, the bytes of slots 4 b + j) and B = {X_j(a), X_j(b)}, the same
    in every column; four independent accumulators D_j. Since every column of B is the same token, D row g is the
    whole group's sum in every lane of the quad: each lane returns DEN8[k] Σ x Q of rows e0, e1 (as fp32, exact:
    |Σ| < 2^24)."""
    L = ["{", ".reg .b32 t, u0, u1, u2, u3, z, s, v;"]
    L += [".reg .b32 " + ", ".join(f"r{w}{j}" for j in range(4)) + ";" for w in "abcd"]
    L += [".reg .b32 " + ", ".join(f"d{j}{i}" for i in range(4)) + ";" for j in range(4)]
    for w, off in zip("abcd", (2, 3, 4, 5)):  # a: (e0, chunk a), b: (e1, a), c: (e0, chunk b), d: (e1, b)
        L += q_bytes_ptx(ks, [f"${off + 4 * e}" for e in range(ks)], f"r{w}")
    L.append("mov.b32 z, 0;")
    x0 = 2 + 4 * ks
    for j in range(4):
        L.append(f"mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {{d{j}0, d{j}1, d{j}2, d{j}3}}, "
                 f"{{ra{j}, rb{j}, rc{j}, rd{j}}}, {{${x0 + 2 * j}, ${x0 + 2 * (4 + j)}}}, {{z, z, z, z}};")
    mul = MUL8[ks]
    for out, i in (("$0", 0), ("$1", 2)):  # c0: row g, c2: row g + 8
        L.append(f"mov.b32 s, d3{i};" if mul[3] == 1 else f"mul.lo.s32 s, d3{i}, {mul[3]};")
        for j in (2, 1, 0):
            L.append(f"add.s32 s, s, d{j}{i};" if mul[j] == 1 else f"mad.lo.s32 s, d{j}{i}, {mul[j]}, s;")
        L.append(f"cvt.rn.f32.s32 {out}, s;")
    L.append("}")
    return "\n".join(L)


def asm_xsum_text() -> str:
    """PTX: x pairs $1..$8 -> $0 = Σ x / 16 (fp16x2 accumulation, then fp32)."""
    L = ["{", ".reg .b32 a, c;", ".reg .b16 h0, h1;", ".reg .f32 f0, f1;", f"mov.b32 c, {_h2(1 / 16)};"]
    for j in range(8):
        if j == 0:
            L.append(f"mul.rn.f16x2 a, ${1 + j}, c;")
        else:
            L.append(f"fma.rn.f16x2 a, ${1 + j}, c, a;")
    L += ["mov.b32 {h0, h1}, a;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", "add.f32 $0, f0, f1;", "}"]
    return "\n".join(L)


ASM_CC_1 = tl.constexpr(asm_cc_text(1))
ASM_CC_2 = tl.constexpr(asm_cc_text(2))
ASM_CC_3 = tl.constexpr(asm_cc_text(3))
ASM_CC_4 = tl.constexpr(asm_cc_text(4))
ASM_MMA_1 = tl.constexpr(asm_mma_text(1))
ASM_MMA_2 = tl.constexpr(asm_mma_text(2))
ASM_MMA_3 = tl.constexpr(asm_mma_text(3))
ASM_MMA_4 = tl.constexpr(asm_mma_text(4))
ASM_XSUM = tl.constexpr(asm_xsum_text())
CC_CONS_1 = tl.constexpr("=r" + ",r" * 9)
CC_CONS_2 = tl.constexpr("=r" + ",r" * 10)
CC_CONS_3 = tl.constexpr("=r" + ",r" * 11)
CC_CONS_4 = tl.constexpr("=r" + ",r" * 12)
MMA_CONS_1 = tl.constexpr("=r,=r" + ",r" * 36)
MMA_CONS_2 = tl.constexpr("=r,=r" + ",r" * 40)
MMA_CONS_3 = tl.constexpr("=r,=r" + ",r" * 44)
MMA_CONS_4 = tl.constexpr("=r,=r" + ",r" * 48)
XSUM_CONS = tl.constexpr("=r" + ",r" * 8)
ASM_MMA8_1 = tl.constexpr(asm_mma8_text(1))
ASM_MMA8_2 = tl.constexpr(asm_mma8_text(2))
ASM_MMA8_3 = tl.constexpr(asm_mma8_text(3))
ASM_MMA8_4 = tl.constexpr(asm_mma8_text(4))
MMA8_CONS_1 = tl.constexpr("=r,=r" + ",r" * 20)
MMA8_CONS_2 = tl.constexpr("=r,=r" + ",r" * 24)
MMA8_CONS_3 = tl.constexpr("=r,=r" + ",r" * 28)
MMA8_CONS_4 = tl.constexpr("=r,=r" + ",r" * 32)
ASM_LDX = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$8];\nld.global.nc.v4.b32 {$4, $5, $6, $7}, [$8 + 16];")
LDX_CONS = tl.constexpr("=r," * 8 + "l")
I32X8 = tl.constexpr((tl.int32,) * 8)
# s_1, z_1 as raw fp16: converted where they are used (a conversion inside this block would wait for the load
# right where the prefetch issues it: the first ncu profile of v7 found 1/3 of all stall samples there)
# (zero-extended into 32-bit registers: a 16-bit loop-carried value costs a PRMT that waits for the load at the
# end of the iteration)
ASM_LDW2 = tl.constexpr("ld.global.nc.v2.b32 {$0, $1}, [$2];")
ASM_LDX16 = tl.constexpr("\n".join(f"ld.global.nc.v4.b32 {{${4 * i}, ${4 * i + 1}, ${4 * i + 2}, ${4 * i + 3}}}, "
                                    f"[$16 + {16 * i}];" for i in range(4)))
I32X16 = tl.constexpr((tl.int32,) * 16)
ASM_LDSZ = tl.constexpr("ld.global.nc.u16 $0, [$2];\nld.global.nc.u16 $1, [$3];")
LDSZ_CONS = tl.constexpr("=r,=r,l,l")
ASM_CVT_LO = tl.constexpr("{\n.reg .b16 l, h;\nmov.b32 {l, h}, $1;\ncvt.f32.f16 $0, l;\n}")
ASM_L2PF = tl.constexpr("{\n.reg .pred p;\nsetp.ne.s32 p, $2, 0;\n@p cp.async.bulk.prefetch.L2.global [$1], $2;\n"
                         "mov.u32 $0, 0;\n}")  # size 0: nothing
L2PF_CONS = tl.constexpr("=r,l,r")
I32X2 = tl.constexpr((tl.int32, tl.int32))


@triton.jit
def l2_prefetch_tile(w_ptr, n0, N, g_lo, g_hi, BLOCK_N: tl.constexpr, WPG: tl.constexpr):
    """Request plane 1 of a program's tile (rows n0 .. n0 + BLOCK_N, groups g_lo .. g_hi) into L2, no registers held.
    Group-major words make rows n0.. of one group one contiguous block; element i of the (BLOCK_N,) tensor issues
    group g_lo + i's (the first BLOCK_N groups of the split; size 0 past g_hi or in an empty split)."""
    i = tl.arange(0, BLOCK_N)
    nbytes = tl.where(i < g_hi - g_lo, tl.minimum(N - n0, BLOCK_N) * (WPG * 4), 0)
    a = (w_ptr + ((g_lo + i) * N + n0) * WPG).to(tl.int64, bitcast=True)
    tl.inline_asm_elementwise(ASM_L2PF, L2PF_CONS, [a, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _q_f32(w0, w1, w2, w3, SLOT: tl.constexpr, KS: tl.constexpr):
    """q = Q_KS 4^-(KS-1) / 16 - 1/8 of bit slot SLOT, fp32 (interpreter path)."""
    q = (w0 >> (2 * SLOT)) & 3
    if KS > 1:
        q = q * 4 + ((w1 >> (2 * SLOT)) & 3)
    if KS > 2:
        q = q * 4 + ((w2 >> (2 * SLOT)) & 3)
    if KS > 3:
        q = q * 4 + ((w3 >> (2 * SLOT)) & 3)
    return q.to(tl.float32) * (0.25 ** (KS - 1) / 16.0) - 0.125


@triton.jit
def _pair_f32(xp, HI: tl.constexpr):
    """One fp16 half of an int32 x pair, as fp32 (interpreter path)."""
    if HI:
        h = (xp >> 16) & 0xFFFF
    else:
        h = xp & 0xFFFF
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """P = Σ_{16 positions} q x per word (fp32), for word tensors w* and x-pair tensors x* that broadcast."""
    if USE_ASM:
        if KS == 1:
            P = tl.inline_asm_elementwise(ASM_CC_1, CC_CONS_1, [x0, x1, x2, x3, x4, x5, x6, x7, w0],
                                          dtype=tl.float32, is_pure=True, pack=1)
        elif KS == 2:
            P = tl.inline_asm_elementwise(ASM_CC_2, CC_CONS_2, [x0, x1, x2, x3, x4, x5, x6, x7, w0, w1],
                                          dtype=tl.float32, is_pure=True, pack=1)
        elif KS == 3:
            P = tl.inline_asm_elementwise(ASM_CC_3, CC_CONS_3, [x0, x1, x2, x3, x4, x5, x6, x7, w0, w1, w2],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            P = tl.inline_asm_elementwise(ASM_CC_4, CC_CONS_4, [x0, x1, x2, x3, x4, x5, x6, x7, w0, w1, w2, w3],
                                          dtype=tl.float32, is_pure=True, pack=1)
    else:  # register j = slots (j, j + 8) = positions (2j, 2j + 1) = x pair j
        P = _q_f32(w0, w1, w2, w3, 0, KS) * _pair_f32(x0, False) + _q_f32(w0, w1, w2, w3, 8, KS) * _pair_f32(x0, True)
        P += _q_f32(w0, w1, w2, w3, 1, KS) * _pair_f32(x1, False) + _q_f32(w0, w1, w2, w3, 9, KS) * _pair_f32(x1, True)
        P += _q_f32(w0, w1, w2, w3, 2, KS) * _pair_f32(x2, False) + _q_f32(w0, w1, w2, w3, 10, KS) * _pair_f32(x2, True)
        P += _q_f32(w0, w1, w2, w3, 3, KS) * _pair_f32(x3, False) + _q_f32(w0, w1, w2, w3, 11, KS) * _pair_f32(x3, True)
        P += _q_f32(w0, w1, w2, w3, 4, KS) * _pair_f32(x4, False) + _q_f32(w0, w1, w2, w3, 12, KS) * _pair_f32(x4, True)
        P += _q_f32(w0, w1, w2, w3, 5, KS) * _pair_f32(x5, False) + _q_f32(w0, w1, w2, w3, 13, KS) * _pair_f32(x5, True)
        P += _q_f32(w0, w1, w2, w3, 6, KS) * _pair_f32(x6, False) + _q_f32(w0, w1, w2, w3, 14, KS) * _pair_f32(x6, True)
        P += _q_f32(w0, w1, w2, w3, 7, KS) * _pair_f32(x7, False) + _q_f32(w0, w1, w2, w3, 15, KS) * _pair_f32(x7, True)
    return P


@triton.jit
def _xsum(x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM: tl.constexpr):
    """Σ x / 16 over the 16 positions of a word (fp32)."""
    if USE_ASM:
        X = tl.inline_asm_elementwise(ASM_XSUM, XSUM_CONS, [x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        X = _pair_f32(x0, False) + _pair_f32(x0, True) + _pair_f32(x1, False) + _pair_f32(x1, True)
        X += _pair_f32(x2, False) + _pair_f32(x2, True) + _pair_f32(x3, False) + _pair_f32(x3, True)
        X += _pair_f32(x4, False) + _pair_f32(x4, True) + _pair_f32(x5, False) + _pair_f32(x5, True)
        X += _pair_f32(x6, False) + _pair_f32(x6, True) + _pair_f32(x7, False) + _pair_f32(x7, True)
        X = X * 0.0625
    return X


@triton.jit
def _load_words(g, g_hi, w_ptrs, n_mask, N, plane_stride, KS: tl.constexpr, GPI: tl.constexpr, WPG: tl.constexpr):
    """The KS plane word tiles (BN, GPI, WPG) of groups g .. g + GPI - 1 (zeros past g_hi; unused planes repeat w0;
    group-major words: group g at w_ptrs + g N WPG)."""
    gm = (g + tl.arange(0, GPI)) < g_hi
    wm = n_mask[:, None, None] & gm[None, :, None]
    return load_planes(w_ptrs + g * (N * WPG), plane_stride, wm, KS)


@triton.jit
def _load_sz(g, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI: tl.constexpr, USE_ASM: tl.constexpr):
    """s_1, z_1 (BN, GPI): the fp16 bits in int32, of groups g .. g + GPI - 1 (groups past g_hi re-read a valid one
    or give 0: the caller zeroes their scale). Nothing here consumes the loaded values, so a prefetch does not wait
    for them."""
    i_g = tl.arange(0, GPI)
    if USE_ASM:  # loaded in the words' layout (tl.load would pick a coalesced one and convert via shared memory)
        off = (tl.minimum(g + i_g, g_hi - 1) - i_g)[None, :] * N  # groups past g_hi re-read a valid one
        sa = (s_ptrs + off).to(tl.int64, bitcast=True)
        za = (z_ptrs + off).to(tl.int64, bitcast=True)
        s, z = tl.inline_asm_elementwise(ASM_LDSZ, LDSZ_CONS, [sa, za], dtype=I32X2, is_pure=True, pack=1)
    else:
        gm = (g + i_g) < g_hi
        sm = n_mask[:, None] & gm[None, :]
        s = tl.load(s_ptrs + g * N, mask=sm, other=0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        z = tl.load(z_ptrs + g * N, mask=sm, other=0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return s, z


@triton.jit
def _f16_bits_to_f32(v, USE_ASM: tl.constexpr):
    """fp32 of the fp16 in the low 16 bits of an int32 (in PTX: one conversion of the loaded register, where
    Triton's truncation would pack two loaded halves into one register first, with a PRMT that waits for both)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(ASM_CVT_LO, "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_x(g, g_hi, xi_ptrs, GPI: tl.constexpr, WPG: tl.constexpr, USE_ASM: tl.constexpr):
    """The 8 x-pair tensors (GPI, WPG) int32 of groups g .. g + GPI - 1 (past g_hi: a valid group, or 0)."""
    i_g = tl.arange(0, GPI)
    if USE_ASM:  # two 16-byte loads per word (tl.load of the 8 pairs would be 8 scalar loads)
        gx = tl.minimum(g + i_g, g_hi - 1)  # groups past g_hi re-read a valid one (their scale is 0)
        xa = (xi_ptrs + (gx - i_g)[:, None] * (WPG * 8)).to(tl.int64, bitcast=True)
        x0, x1, x2, x3, x4, x5, x6, x7 = tl.inline_asm_elementwise(
            ASM_LDX, LDX_CONS, [xa], dtype=I32X8, is_pure=True, pack=1)
    else:
        xm = ((g + i_g) < g_hi)[:, None]
        xp = xi_ptrs + g * (WPG * 8)
        x0 = tl.load(xp, mask=xm, other=0)
        x1 = tl.load(xp + 1, mask=xm, other=0)
        x2 = tl.load(xp + 2, mask=xm, other=0)
        x3 = tl.load(xp + 3, mask=xm, other=0)
        x4 = tl.load(xp + 4, mask=xm, other=0)
        x5 = tl.load(xp + 5, mask=xm, other=0)
        x6 = tl.load(xp + 6, mask=xm, other=0)
        x7 = tl.load(xp + 7, mask=xm, other=0)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _cc_step(acc, w0, w1, w2, w3, s, z, x0, x1, x2, x3, x4, x5, x6, x7, g, g_hi, KS: tl.constexpr,
             GPI: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (BN, GPI, WPG) += s_1 P + s_1 (2 - z_1 + 2^-(2KS-1)) X for groups g .. g + GPI - 1 (s, z: fp16 bits in
    int32, converted here, where they are used; groups past g_hi add 0)."""
    CZ: tl.constexpr = 2.0 + 0.5 ** (2 * KS - 1)
    gm = (g + tl.arange(0, GPI)) < g_hi  # (GPI,)
    s = tl.where(gm[None, :], _f16_bits_to_f32(s, USE_ASM), 0.0)
    z = _f16_bits_to_f32(z, USE_ASM)
    b = s * (CZ - z)
    X = _xsum(x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM)  # (GPI, WPG)
    P = _word_dot(w0, w1, w2, w3, x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None],
                  x7[None], KS, USE_ASM)  # (BN, GPI, WPG)
    acc = acc + s[:, :, None] * P
    acc = acc + b[:, :, None] * X[None]
    return acc


@triton.jit
def _cc_loop(w_row, xi_base, s_row, z_row, n_mask, g_lo, g_hi, N, plane_stride,
             KS: tl.constexpr, GPI_: tl.constexpr, GPK: tl.constexpr, WPG: tl.constexpr, USE_ASM: tl.constexpr,
             PF: tl.constexpr):
    """(BN,) fp32 = Σ over groups [g_lo, g_hi) and words of s_1 P + s_1 (2 - z_1 + 2^-(2KS-1)) X (then times 16).

    w_row (BN, 1, 1) pointers to plane 1 of each row, group 0, word 0 (group-major: group g at + g N WPG);
    xi_base: x pair 0 of the token (int32 pointer); s_row/z_row (BN, 1) pointers to group 0 of each row. GPI = groups
    per iteration: GPI_ at k = 3, 4, and with GPK, 4 GPI_ at k = 1 and 2 GPI_ at k = 2, so that an iteration loads the
    same bytes at every k.

    PF = 1: the next iteration's words, s and z are loaded one iteration ahead into registers. Whether that hides
    anything is ptxas's choice: in the kernel before the "v7 profile" changes (96 registers) it gave the loaded and
    the loop-carried words the same registers, issued the loads at the end of the body, once the current words were
    dead, and the copy on the back edge waited for them (KERNEL_NOTES.md, "v7 profile"). PF = 2: the loop is
    unrolled by two with two register sets A and B (load B, compute A, load A, compute B), so no loaded value is
    loop-carried or copied and each load can overlap the other half's compute.
    """
    if GPK and KS < 3:
        GPI: tl.constexpr = GPI_ * (4 // KS)
    else:
        GPI: tl.constexpr = GPI_
    i_g = tl.arange(0, GPI)
    i_w = tl.arange(0, WPG)
    BN: tl.constexpr = w_row.shape[0]
    w_ptrs = w_row + (i_g[None, :, None] * (N * WPG) + i_w[None, None, :])  # (BN, GPI, WPG), group-major words
    xi_ptrs = xi_base + (i_g[:, None] * WPG + i_w[None, :]) * 8  # (GPI, WPG)
    s_ptrs = s_row + i_g[None, :] * N  # (BN, GPI)
    z_ptrs = z_row + i_g[None, :] * N
    acc = tl.zeros((BN, GPI, WPG), tl.float32)
    if PF == 2:
        a0, a1, a2, a3 = _load_words(g_lo, g_hi, w_ptrs, n_mask, N, plane_stride, KS, GPI, WPG)
        sa, za = _load_sz(g_lo, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI, USE_ASM)
        for g in range(g_lo, g_hi, 2 * GPI):
            gb = g + GPI
            b0, b1, b2, b3 = _load_words(gb, g_hi, w_ptrs, n_mask, N, plane_stride, KS, GPI, WPG)
            sb, zb = _load_sz(gb, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI, USE_ASM)
            p0, p1, p2, p3, p4, p5, p6, p7 = _load_x(g, g_hi, xi_ptrs, GPI, WPG, USE_ASM)
            acc = _cc_step(acc, a0, a1, a2, a3, sa, za, p0, p1, p2, p3, p4, p5, p6, p7, g, g_hi, KS, GPI, USE_ASM)
            a0, a1, a2, a3 = _load_words(g + 2 * GPI, g_hi, w_ptrs, n_mask, N, plane_stride, KS, GPI, WPG)
            sa, za = _load_sz(g + 2 * GPI, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI, USE_ASM)
            q0, q1, q2, q3, q4, q5, q6, q7 = _load_x(gb, g_hi, xi_ptrs, GPI, WPG, USE_ASM)
            acc = _cc_step(acc, b0, b1, b2, b3, sb, zb, q0, q1, q2, q3, q4, q5, q6, q7, gb, g_hi, KS, GPI,
                           USE_ASM)
    else:
        if PF:
            v0, v1, v2, v3 = _load_words(g_lo, g_hi, w_ptrs, n_mask, N, plane_stride, KS, GPI, WPG)
            sv, zv = _load_sz(g_lo, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI, USE_ASM)
        for g in range(g_lo, g_hi, GPI):
            if PF:  # words, scales and zero points of the next iteration issued before this one is computed
                w0, w1, w2, w3, s, z = v0, v1, v2, v3, sv, zv
                v0, v1, v2, v3 = _load_words(g + GPI, g_hi, w_ptrs, n_mask, N, plane_stride, KS, GPI, WPG)
                sv, zv = _load_sz(g + GPI, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI, USE_ASM)
            else:
                w0, w1, w2, w3 = _load_words(g, g_hi, w_ptrs, n_mask, N, plane_stride, KS, GPI, WPG)
                s, z = _load_sz(g, g_hi, s_ptrs, z_ptrs, n_mask, N, GPI, USE_ASM)
            x0, x1, x2, x3, x4, x5, x6, x7 = _load_x(g, g_hi, xi_ptrs, GPI, WPG, USE_ASM)
            acc = _cc_step(acc, w0, w1, w2, w3, s, z, x0, x1, x2, x3, x4, x5, x6, x7, g, g_hi, KS, GPI, USE_ASM)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _mma_dot(wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, xs, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """(BN, 4) fp32: per element (row, t) a share of the row's dot with x over the group (the sum over t is the dot).
    wa*/wb*: planes' words of chunks 2t / 2t + 1; xs: the 16 x pairs (1, 4) (8 of chunk 2t, then 8 of chunk 2t + 1).
    PTX: ``asm_mma_text``; interpreter: each element's own two word dots."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = xs
    if USE_ASM:
        xl = [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15]
        if KS == 1:
            P = tl.inline_asm_elementwise(ASM_MMA_1, MMA_CONS_1, [wa0, wb0] + xl, dtype=tl.float32, is_pure=True,
                                          pack=2)
        elif KS == 2:
            P = tl.inline_asm_elementwise(ASM_MMA_2, MMA_CONS_2, [wa0, wb0, wa1, wb1] + xl, dtype=tl.float32,
                                          is_pure=True, pack=2)
        elif KS == 3:
            P = tl.inline_asm_elementwise(ASM_MMA_3, MMA_CONS_3, [wa0, wb0, wa1, wb1, wa2, wb2] + xl,
                                          dtype=tl.float32, is_pure=True, pack=2)
        else:
            P = tl.inline_asm_elementwise(ASM_MMA_4, MMA_CONS_4, [wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3] + xl,
                                          dtype=tl.float32, is_pure=True, pack=2)
    else:
        P = _word_dot(wa0, wa1, wa2, wa3, x0, x1, x2, x3, x4, x5, x6, x7, KS, False)
        P += _word_dot(wb0, wb1, wb2, wb3, x8, x9, x10, x11, x12, x13, x14, x15, KS, False)
    return P


@triton.jit
def _ldw2(p, USE_ASM: tl.constexpr):
    """Words at p and p + 1 (8 bytes), in p's layout."""
    if USE_ASM:
        return tl.inline_asm_elementwise(ASM_LDW2, "=r,=r,l", [p.to(tl.int64, bitcast=True)], dtype=I32X2,
                                         is_pure=True, pack=1)
    return tl.load(p), tl.load(p + 1)


@triton.jit
def _load_words_mma(wp, plane_stride, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """Words of chunks 2t, 2t + 1 (BN, 4) of each plane at wp (valid addresses), in the tile's own layout (tl.load
    would pick a coalesced one and convert it through shared memory); unused planes repeat plane 1."""
    wa0, wb0 = _ldw2(wp, USE_ASM)
    wa1, wb1, wa2, wb2, wa3, wb3 = wa0, wb0, wa0, wb0, wa0, wb0
    if KS > 1:
        wa1, wb1 = _ldw2(wp + plane_stride, USE_ASM)
    if KS > 2:
        wa2, wb2 = _ldw2(wp + 2 * plane_stride, USE_ASM)
    if KS > 3:
        wa3, wb3 = _ldw2(wp + 3 * plane_stride, USE_ASM)
    return wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3


@triton.jit
def _load_x_mma(xp, USE_ASM: tl.constexpr):
    """The 16 x pairs (1, 4) int32 of chunks 2t, 2t + 1 (xp (4,): pair 0 of chunk 2t)."""
    if USE_ASM:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = tl.inline_asm_elementwise(
            ASM_LDX16, "=r," * 16 + "l", [xp.to(tl.int64, bitcast=True)], dtype=I32X16, is_pure=True, pack=1)
    else:
        x0, x1, x2, x3 = tl.load(xp), tl.load(xp + 1), tl.load(xp + 2), tl.load(xp + 3)
        x4, x5, x6, x7 = tl.load(xp + 4), tl.load(xp + 5), tl.load(xp + 6), tl.load(xp + 7)
        x8, x9, x10, x11 = tl.load(xp + 8), tl.load(xp + 9), tl.load(xp + 10), tl.load(xp + 11)
        x12, x13, x14, x15 = tl.load(xp + 12), tl.load(xp + 13), tl.load(xp + 14), tl.load(xp + 15)
    return (x0[None, :], x1[None, :], x2[None, :], x3[None, :], x4[None, :], x5[None, :], x6[None, :], x7[None, :],
            x8[None, :], x9[None, :], x10[None, :], x11[None, :], x12[None, :], x13[None, :], x14[None, :],
            x15[None, :])


@triton.jit
def _load_sz_mma(sp, zp, USE_ASM: tl.constexpr):
    """s_1, z_1 (BN, 1) of one group: the fp16 bits in int32 (converted where they are used, as in ``_load_sz``)."""
    if USE_ASM:
        s, z = tl.inline_asm_elementwise(ASM_LDSZ, LDSZ_CONS, [sp.to(tl.int64, bitcast=True),
                                                               zp.to(tl.int64, bitcast=True)],
                                         dtype=I32X2, is_pure=True, pack=1)
    else:
        s = tl.load(sp).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        z = tl.load(zp).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return s, z


@triton.jit
def _mma_loop(w_rowc, xi_base, s_row, z_row, g_lo, g_hi, N, plane_stride, KS: tl.constexpr,
              USE_ASM: tl.constexpr, PF: tl.constexpr):
    """``_cc_loop`` on the tensor cores (group 128): (BN,) fp32 = Σ over groups [g_lo, g_hi) of s_1 P +
    s_1 (2 - z_1 + 2^-(2KS-1)) X (then times 16), one group per step.

    w_rowc (BN, 1): plane 1, word 0 of each row (rows past N clamped to a valid one, never stored). The (BN, 4) tile
    takes Triton's default layout for that shape, lanes [8, 4] and warps along rows: lane 4 g + t holds chunks 2t,
    2t + 1 of rows g + 8 W i, so the two rows of a pack = 2 instance (i, i + 1) are shared by the lane's quad, as
    mma.sync's A fragment wants (``asm_mma_text``). Needs BN a multiple of 16 W."""
    BN: tl.constexpr = w_rowc.shape[0]
    i_t = tl.arange(0, 4)
    w_ptrs = w_rowc + i_t[None, :] * 2  # (BN, 4): chunk 2t of group 0
    GS = N * 8  # group-major words: group g at w_ptrs + g GS
    xi_ptrs = xi_base + i_t * 16  # (4,): x pair 0 of chunk 2t
    acc = tl.zeros((BN, 4), tl.float32)
    if PF:
        v = _load_words_mma(w_ptrs + g_lo * GS, plane_stride, KS, USE_ASM)
        sv, zv = _load_sz_mma(s_row + g_lo * N, z_row + g_lo * N, USE_ASM)
    for g in range(g_lo, g_hi):
        if PF:  # this group's words, s and z were loaded one step ahead; the next group's are issued now (past the
            w, s, z = v, sv, zv  # end: the last group again, a valid address)
            gn = tl.minimum(g + 1, g_hi - 1)
            v = _load_words_mma(w_ptrs + gn * GS, plane_stride, KS, USE_ASM)
            sv, zv = _load_sz_mma(s_row + gn * N, z_row + gn * N, USE_ASM)
        else:
            w = _load_words_mma(w_ptrs + g * GS, plane_stride, KS, USE_ASM)
            s, z = _load_sz_mma(s_row + g * N, z_row + g * N, USE_ASM)
        acc = _mma_step(acc, w, s, z, _load_x_mma(xi_ptrs + g * 64, USE_ASM), KS, USE_ASM)
    return tl.sum(acc, axis=1)


@triton.jit
def _mma_step(acc, w, s, z, xs, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (BN, 4) += one group's s_1 P + s_1 (2 - z_1 + 2^-(2KS-1)) X (fp16 x on the fp16 tensor cores)."""
    CZ: tl.constexpr = 2.0 + 0.5 ** (2 * KS - 1)
    wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3 = w
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = xs
    sf = _f16_bits_to_f32(s, USE_ASM)
    b = sf * (CZ - _f16_bits_to_f32(z, USE_ASM))
    X = _xsum(x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM) + _xsum(x8, x9, x10, x11, x12, x13, x14, x15, USE_ASM)
    P = _mma_dot(wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, xs, KS, USE_ASM)  # (BN, 4)
    acc = acc + sf * P
    return acc + b * X


@triton.jit
def _ring_x(xi_base, xs_base, g, i_t, A8: tl.constexpr):
    """Group g's activations for the ring loop: int8 words (1, 4) x 8 and (sx, SX) (A8), or the 16 fp16 x pairs
    (then 0, 0). i_t: arange(0, 4), the caller's (so that they come in the tile's layout)."""
    if A8:  # (one return: triton 3.6 checks both branches' return types)
        r = _load_x8(xi_base + i_t * 8 + g * 32, True), tl.load(xs_base + 2 * g), tl.load(xs_base + 2 * g + 1)
    else:
        r = _load_x_mma(xi_base + i_t * 16 + g * 64, True), 0.0, 0.0
    return r


@triton.jit
def _ring_loop(ring, w_ptr, s_ptr, z_ptr, n0, rows, N, plane_stride, xi_base, xs_base, g_lo, g_hi, KS: tl.constexpr,
               BN: tl.constexpr, S: tl.constexpr, EARLY: tl.constexpr, A8: tl.constexpr, x_first):
    """``_mma8_loop`` (A8) or ``_mma_loop`` with the words, s_1 and z_1 streamed through the shared-memory ring
    (bulk_ring.py, S stages): the first S groups are issued at once, and a group's stage is issued again, S groups
    on, as soon as every warp has read it. EARLY: the first stages' plane 1, s and z were issued before the PDL
    wait (only planes 2..KS are issued here), and x_first holds group g_lo's activations, loaded right after the
    wait (before k was read). The activations (L2) are loaded one group ahead into registers, as there. Same
    arithmetic in the same order, so the output is bit for bit the register path's."""
    ng = g_hi - g_lo
    for i in tl.static_range(S):
        if i < ng:
            ring_issue(ring, i, g_lo + i, w_ptr, s_ptr, z_ptr, n0, rows, N, plane_stride, KS, BN, 2 if EARLY else 0)
    i_t = tl.arange(0, 4)
    i_r = tl.arange(0, BN)[:, None]
    offs = i_r * 32 + i_t[None, :] * 8  # (BN, 4): the tile's layout, shared with x's pointers (no conversions)
    offs_sz = i_r * 2 + i_t[None, :] * 0  # (BN, 4): row r's s_1 (and z_1) at 2 r bytes, in every lane of its quad
    if EARLY:
        xv, sxv, SXv = x_first
    else:
        xv, sxv, SXv = _ring_x(xi_base, xs_base, g_lo, i_t, A8)
    acc = tl.zeros((BN, 4), tl.float32)
    for i in range(0, ng):
        slot = i % S
        ring_wait(ring, slot, (i // S) & 1)
        w = ring_words(ring, slot, offs, KS, BN)
        s, z = ring_sz(ring, slot, offs_sz, KS, BN)
        xs, sx, SX = xv, sxv, SXv
        # the next group's (past the end: the last group again, a valid address)
        xv, sxv, SXv = _ring_x(xi_base, xs_base, tl.minimum(g_lo + i + 1, g_hi - 1), i_t, A8)
        tl.debug_barrier()  # every warp has read the slot: it may be filled again
        if i + S < ng:
            ring_issue(ring, slot, g_lo + i + S, w_ptr, s_ptr, z_ptr, n0, rows, N, plane_stride, KS, BN, 0)
        if A8:
            acc = _mma8_step(acc, w, s, z, xs, sx, SX, KS, True)
        else:
            acc = _mma_step(acc, w, s, z, xs, KS, True)
    return tl.sum(acc, axis=1)


@triton.jit
def _byte_dot(w0, w1, w2, w3, xw0, xw1, xw2, xw3, KS: tl.constexpr):
    """Interpreter: Σ Q_k x over one word (16 in-features) from the plane words and the int8 activation words."""
    P = tl.zeros(w0.shape, tl.int32)
    for j in tl.static_range(4):
        R = (w0 >> (2 * j)) & 0x03030303  # byte b: code of slot 4 b + j (plane 1)
        if KS > 1:
            R = (R << 2) | ((w1 >> (2 * j)) & 0x03030303)
        if KS > 2:
            R = (R << 2) | ((w2 >> (2 * j)) & 0x03030303)
        if KS > 3:
            R = (R << 2) | ((w3 >> (2 * j)) & 0x03030303)
        X = xw0 if j == 0 else (xw1 if j == 1 else (xw2 if j == 2 else xw3))
        for b in tl.static_range(4):
            P += ((R >> (8 * b)) & 0xFF) * ((X << (24 - 8 * b)) >> 24)  # unsigned code x signed activation
    return P


@triton.jit
def _mma8_dot(wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, xs, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """(BN, 4) fp32: per element (row, t) 4 DEN8[KS] times a share of the row's Σ x Q over the group (the sum over
    t is 4 DEN8 Σ x Q): PTX ``asm_mma8_text`` returns the whole sum in each of the quad's lanes; the interpreter
    the element's own two words, times 4."""
    xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3 = xs
    if USE_ASM:
        xl = [xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3]
        if KS == 1:
            P = tl.inline_asm_elementwise(ASM_MMA8_1, MMA8_CONS_1, [wa0, wb0] + xl, dtype=tl.float32, is_pure=True,
                                          pack=2)
        elif KS == 2:
            P = tl.inline_asm_elementwise(ASM_MMA8_2, MMA8_CONS_2, [wa0, wb0, wa1, wb1] + xl, dtype=tl.float32,
                                          is_pure=True, pack=2)
        elif KS == 3:
            P = tl.inline_asm_elementwise(ASM_MMA8_3, MMA8_CONS_3, [wa0, wb0, wa1, wb1, wa2, wb2] + xl,
                                          dtype=tl.float32, is_pure=True, pack=2)
        else:
            P = tl.inline_asm_elementwise(ASM_MMA8_4, MMA8_CONS_4, [wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3] + xl,
                                          dtype=tl.float32, is_pure=True, pack=2)
    else:
        D = _byte_dot(wa0, wa1, wa2, wa3, xa0, xa1, xa2, xa3, KS) + _byte_dot(wb0, wb1, wb2, wb3, xb0, xb1, xb2, xb3,
                                                                              KS)
        P = D.to(tl.float32) * (4.0 * (64.0 if KS == 1 else (16.0 if KS == 2 else 1.0)))
    return P


@triton.jit
def _load_x8(xp, USE_ASM: tl.constexpr):
    """The 8 int32 activation words (1, 4) of chunks 2t, 2t + 1 (xp (4,): word 0 of chunk 2t; 32 bytes)."""
    if USE_ASM:
        x0, x1, x2, x3, x4, x5, x6, x7 = tl.inline_asm_elementwise(
            ASM_LDX, LDX_CONS, [xp.to(tl.int64, bitcast=True)], dtype=I32X8, is_pure=True, pack=1)
    else:
        x0, x1, x2, x3 = tl.load(xp), tl.load(xp + 1), tl.load(xp + 2), tl.load(xp + 3)
        x4, x5, x6, x7 = tl.load(xp + 4), tl.load(xp + 5), tl.load(xp + 6), tl.load(xp + 7)
    return (x0[None, :], x1[None, :], x2[None, :], x3[None, :], x4[None, :], x5[None, :], x6[None, :], x7[None, :])


@triton.jit
def _mma8_group(g, w_ptrs, xq_ptrs, xs_base, s_row, z_row, N, plane_stride, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """Everything one group's step reads: the plane words, s_1 and z_1 of the tile's rows, the activation words,
    and (sx, SX)."""
    w = _load_words_mma(w_ptrs + g * (N * 8), plane_stride, KS, USE_ASM)  # group-major: group g at + g N 8 words
    s, z = _load_sz_mma(s_row + g * N, z_row + g * N, USE_ASM)
    return w, s, z, _load_x8(xq_ptrs + g * 32, USE_ASM), tl.load(xs_base + 2 * g), tl.load(xs_base + 2 * g + 1)


@triton.jit
def _mma8_step(acc, w, s, z, xs, sx, SX, KS: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (BN, 4) += one group's s_1 sx 4^-(k-1) (Σ xq Q_k - (4^(k-1) z_1 - 1/2) SX) / 64 / DEN8."""
    SH: tl.constexpr = 4.0 ** (KS - 1)
    DEN: tl.constexpr = 64.0 if KS == 1 else (16.0 if KS == 2 else 1.0)
    wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3 = w
    sxf = sx * (1.0 / (SH * DEN * 64.0))  # 1/16 (caller), 1/4 (the quad's copies)
    P = _mma8_dot(wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, xs, KS, USE_ASM)  # (BN, 4)
    cz = _f16_bits_to_f32(z, USE_ASM) * SH - 0.5  # (BN, 1)
    return acc + (_f16_bits_to_f32(s, USE_ASM) * sxf) * (P - cz * (SX * DEN))


@triton.jit
def _mma8_loop(w_rowc, xq_base, xs_base, s_row, z_row, g_lo, g_hi, N, plane_stride, KS: tl.constexpr,
               USE_ASM: tl.constexpr, PF: tl.constexpr):
    """``_mma_loop`` with int8 activations (act_int8.py; group 128): (BN,) fp32 = Σ over groups [g_lo, g_hi) of
    s_1 sx 4^-(k-1) (Σ xq Q_k - (4^(k-1) z_1 - 1/2) SX), divided by 16 (the caller's final factor), one group per
    step on mma.sync m16n8k32 (``asm_mma8_text``). Same tile and layout as ``_mma_loop``; xq_base: the token's int32
    activation words, xs_base: its (sx, SX) per group.

    PF (any non-zero value): the next group's words, s, z and activations (from L2: every program reads them) are
    loaded one step ahead. Deeper prefetch (two groups ahead, or the loop unrolled by two as ``_cc_loop``'s PF = 2)
    measured slower at every k (KERNEL_NOTES.md, "Eleventh session")."""
    BN: tl.constexpr = w_rowc.shape[0]
    i_t = tl.arange(0, 4)
    w_ptrs = w_rowc + i_t[None, :] * 2  # (BN, 4): chunk 2t of group 0
    xq_ptrs = xq_base + i_t * 8  # (4,): word 0 of chunk 2t (4 words of int8 per 16 in-features)
    acc = tl.zeros((BN, 4), tl.float32)
    if PF:
        v = _mma8_group(g_lo, w_ptrs, xq_ptrs, xs_base, s_row, z_row, N, plane_stride, KS, USE_ASM)
    for g in range(g_lo, g_hi):
        if PF:  # this group's loads were issued one step ahead; the next group's are issued now (past the
            cur = v  # end: the last group again, a valid address)
            v = _mma8_group(tl.minimum(g + 1, g_hi - 1), w_ptrs, xq_ptrs, xs_base, s_row, z_row, N,
                            plane_stride, KS, USE_ASM)
        else:
            cur = _mma8_group(g, w_ptrs, xq_ptrs, xs_base, s_row, z_row, N, plane_stride, KS, USE_ASM)
        w, s, z, xs, sx, SX = cur
        acc = _mma8_step(acc, w, s, z, xs, sx, SX, KS, USE_ASM)
    return tl.sum(acc, axis=1)


@triton.jit
def _row_dots(w_row, w_row1, xi_base, xs_base, s_row, z_row, n_mask, g_lo, g_hi, N, plane_stride, KS: tl.constexpr,
              GPI: tl.constexpr, GPK: tl.constexpr, WPG: tl.constexpr, USE_ASM: tl.constexpr, PF: tl.constexpr,
              MMA: tl.constexpr, A8: tl.constexpr, rtile, RING: tl.constexpr, RS: tl.constexpr,
              REARLY: tl.constexpr):
    """(BN,) the rows' sums before the final factor 16: with int8 activations (A8) on the int8 tensor cores, else
    on the fp16 tensor cores if bit KS - 1 of MMA is set, else on the CUDA cores (the tile, split-K and prefetch
    are the launch's, for all three). Bit KS - 1 of RING streams the tensor-core paths' words through shared
    memory (``_ring_loop``; rtile = (ring, w_ptr, s_ptr, z_ptr, n0, rows, x_first) of the program)."""
    if (RING >> (KS - 1)) & 1 and (A8 or (MMA >> (KS - 1)) & 1):
        ring, w_ptr, s_ptr, z_ptr, n0, rows, x_first = rtile
        return _ring_loop(ring, w_ptr, s_ptr, z_ptr, n0, rows, N, plane_stride, xi_base, xs_base, g_lo, g_hi, KS,
                          w_row1.shape[0], RS, REARLY, A8, x_first)
    if A8:
        return _mma8_loop(w_row1[:, None], xi_base, xs_base, s_row, z_row, g_lo, g_hi, N, plane_stride, KS, USE_ASM,
                          PF)
    if (MMA >> (KS - 1)) & 1:
        return _mma_loop(w_row1[:, None], xi_base, s_row, z_row, g_lo, g_hi, N, plane_stride, KS, USE_ASM, PF)
    return _cc_loop(w_row, xi_base, s_row, z_row, n_mask, g_lo, g_hi, N, plane_stride, KS, GPI, GPK, WPG, USE_ASM,
                    PF)


@triton.jit
def _sliced_gemv_cc_kernel(
    x_ptr, y_ptr, k_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, cnt_ptr, xs_ptr,
    N, G, stride_xm, stride_ym, plane_stride,
    w1_ptr, s1_ptr, z1_ptr, N1, plane_stride1, w2_ptr, s2_ptr, z2_ptr, N2, plane_stride2,
    rws_ptr, rb1_ptr, rw2_ptr, rb2_ptr, rtau_ptr, ron_ptr, roff_ptr, rgiven_ptr, rcin_ptr, rout_ptr, R_OFF,
    rp_cos, rp_sin, rp_pos, rp_kc, rp_vc, rp_q, RP_S,
    fd_h, fd_w, fd_q, fd_xs, fd_ss, fd_s, fd_w1, fd_given, fd_ws, fd_dest, rs_ss, rs_eps,
    E: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr, SPLIT_K: tl.constexpr,
    SPLIT_K12: tl.constexpr,
    USE_ASM: tl.constexpr, PF: tl.constexpr, GPK: tl.constexpr, PDL: tl.constexpr,
    NSEG: tl.constexpr, ROUTE: tl.constexpr, RH: tl.constexpr, REM1: tl.constexpr, RHP: tl.constexpr,
    RSPLIT: tl.constexpr, MMA: tl.constexpr, A8: tl.constexpr, RING: tl.constexpr, RS: tl.constexpr,
    REARLY: tl.constexpr, ROPE: tl.constexpr, HD: tl.constexpr, FOLD: tl.constexpr, FR: tl.constexpr,
    FH: tl.constexpr, FHP: tl.constexpr, RSTD: tl.constexpr,
):
    """x_ptr: x as int32 pairs (M, K/2), or with A8 the int8 activation words (M, K/4) and xs_ptr their (sx, SX)
    (M, G, 2) (act_int8.py); stride_xm in int32 units.

    NSEG > 1: up to three weights of one input (w, w1, w2 with N, N1, N2 rows) in one launch, their outputs side by
    side in y (M, N + N1 + N2); the n-tiles of weight s follow those of the weights before it, and token m of weight
    s takes k[m, s] (k (M, NSEG)). NSEG = 1 compiles to the single-weight kernel.

    ROUTE: the slice count of weight s is not read from k but finished here from router R_OFF + s's fc1 partials,
    which the router launch before this one stored (router.route_partials; rws (R, RSPLIT, RHP) fp32):
    every program sums them, applies fc2 and the thresholds (router.route_finish: the router kernel's own code), and
    the first program of each weight stores the count at rout[R_OFF + s]. A given count (rgiven) is rcin's.

    ROPE (q/k/v, NSEG = 3, one token, split-K, tiles of whole heads of HD features): the rotary and cache write of
    decode_step.rope_kv done by each tile's last split (``_rope_tile``) in place of the store of y: q rotated into
    rp_q (H, HD), k rotated and v into the caches rp_kc, rp_vc (KV, RP_S, HD) at slot rp_pos.

    FOLD (one weight, one token, tiles of GROUP rows): each tile's last split computes router.NormFold's step for
    the next group's input (decode_step.norm_fold_tile, fd_*: h, the norm weight, the codes' buffers, the sums of
    squares, the next group's FR routers' scales, fc1 and given flags, their partials) instead of storing y.
    RSTD > 0 (with ROUTE): x is such a fold's output; the program sums its RSTD sums of squares (rs_ss) into
    rstd = 1 / sqrt(sum / K + rs_eps) and scales its dot products and the routers' fc1 sums by it."""
    pid_g = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    n_tiles = tl.num_programs(0)
    WPG: tl.constexpr = GROUP // 16
    if NSEG == 1:
        pid_n = pid_g
        seg = 0
        row0 = 0
    else:  # which weight this n-tile belongs to, and its rows there
        T0 = tl.cdiv(N, BLOCK_N)
        T1 = tl.cdiv(N1, BLOCK_N)
        seg = (pid_g >= T0).to(tl.int32) + (pid_g >= T0 + T1).to(tl.int32)
        pid_n = pid_g - tl.where(seg >= 1, T0, 0) - tl.where(seg >= 2, T1, 0)
        row0 = tl.where(seg >= 1, N, 0) + tl.where(seg >= 2, N1, 0)
        if seg == 1:
            w_ptr = w1_ptr
            s_ptr = s1_ptr
            z_ptr = z1_ptr
            N = N1
            plane_stride = plane_stride1
        elif seg == 2:
            w_ptr = w2_ptr
            s_ptr = s2_ptr
            z_ptr = z2_ptr
            N = N2
            plane_stride = plane_stride2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    gps = tl.cdiv(G, SPLIT_K)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, G)
    w_row = w_ptr + offs_n[:, None, None] * WPG  # (BN, 1, 1) plane 1, group 0 (group-major words)
    xi_base = x_ptr + m * stride_xm
    n_c = tl.minimum(offs_n, N - 1)  # rows past N read row N - 1 (never stored)
    w_row1 = w_ptr + n_c * WPG  # (BN,)
    # cp.async.bulk.prefetch.L2 takes 16-byte aligned addresses and sizes: groups of a multiple of 64 weights
    L2OK: tl.constexpr = GROUP % 64 == 0
    s_row = s_ptr + n_c[:, None]
    z_row = z_ptr + n_c[:, None]
    if RING != 0:  # the shared-memory ring of the words (bulk_ring.py)
        ring = ring_base()
        if REARLY:  # its barriers set up before the first stages are issued, before the PDL wait
            ring_init(ring, RS)
    else:
        ring = 0
    if ROUTE:  # the router's given flag and count: written by the host's copies (set_budget, set_k) before the
        # graph runs, never by a kernel of the step, so read before the PDL wait (one round trip fewer after it)
        r = R_OFF + seg
        r_given = tl.load(rgiven_ptr + r) != 0
        r_cin = tl.load(rcin_ptr + r)
    f_w = 0
    f_col = 0
    f_h = 0
    f_g0 = 1
    f_g1 = 1
    f_g2 = 1
    if FOLD:  # the fold's constants (norm weights, given flags, byte order), before the PDL wait
        f_w = tl.load(fd_w + offs_n)
        f_col = byte_cols(fd_dest, GROUP)
        if FR > 0:
            f_g0 = tl.load(fd_given)
        if FR > 1:
            f_g1 = tl.load(fd_given + 1)
        if FR > 2:
            f_g2 = tl.load(fd_given + 2)
    if PDL:
        # Programmatic dependent launch: this program may start while the previous kernel still runs. Before the
        # wait it touches only the weights (never written by a kernel): plane 1, which every k reads, is requested
        # into L2 (REARLY: the ring's first stages get their plane 1, s and z already), and with ROUTE the
        # router's flag and given count. x, k, y and the split-K workspace are touched only after the wait.
        if REARLY:
            for i in tl.static_range(RS):
                if g_lo + i < g_hi:
                    ring_issue(ring, i, g_lo + i, w_ptr, s_ptr, z_ptr, pid_n * BLOCK_N,
                               tl.minimum(N - pid_n * BLOCK_N, BLOCK_N), N, plane_stride, 1, BLOCK_N, 1)
        if L2OK:
            l2_prefetch_tile(w_ptr, pid_n * BLOCK_N, N, g_lo, g_hi, BLOCK_N, WPG)
        one = tl.full((1,), 0, tl.int32)
        tl.inline_asm_elementwise(ASM_GDC_LAUNCH, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise(ASM_GDC_WAIT, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
    if FOLD:  # the tile's h, for its last split (written by an earlier kernel of the step)
        f_h = tl.load(fd_h + offs_n)
    rstd = 1.0
    if RSTD > 0:  # a fold's sums of squares, right after the wait: in flight with the first activations
        rstd = _rstd(rs_ss, rs_eps, G * GROUP, RSTD)
    if REARLY:  # the split's first activations, before k is read (the split-K ranges do not depend on k here)
        x_first = _ring_x(xi_base, xs_ptr + m * G * 2, g_lo, tl.arange(0, 4), A8)
    else:
        x_first = 0
    rtile = (ring, w_ptr, s_ptr, z_ptr, pid_n * BLOCK_N, tl.minimum(N - pid_n * BLOCK_N, BLOCK_N), x_first)
    rope = (rp_cos, rp_sin, rp_pos, rp_kc, rp_vc, rp_q, RP_S, seg, pid_n * BLOCK_N)
    if ROUTE:  # one token (M = 1): the count from the router's partials, as router.route_counts finishes it
        if r_given:
            cnt = r_cin
        else:
            cnt = route_finish(rws_ptr + r * (RSPLIT * RHP), rb1_ptr, rw2_ptr, rb2_ptr, rtau_ptr, ron_ptr, roff_ptr,
                               r, RH, REM1, RHP, RSPLIT, False, USE_ASM, rstd, RSTD > 0)
        if (pid_n == 0) & (pid_k == 0):
            tl.store(rout_ptr + r, cnt)
        kt = tl.minimum(tl.maximum(cnt, 1), E)
    else:
        kt = tl.minimum(tl.maximum(tl.load(k_ptr + m * NSEG + seg), 1), E)
    if SPLIT_K12 != SPLIT_K:  # fewer splits at k <= 2 (same grid): the tile's programs past them do nothing
        nsplit = tl.where(kt <= 2, SPLIT_K12, SPLIT_K)
        gps = tl.cdiv(G, nsplit)
        g_lo = pid_k * gps
        g_hi = tl.minimum(g_lo + gps, G)
    else:
        nsplit = SPLIT_K
    if pid_k < nsplit:
        if RING != 0 and not REARLY:  # here, so that the programs past nsplit return at once
            ring_init(ring, RS)
        _finish_tile(w_row, w_row1, xi_base, xs_ptr + m * G * 2, s_row, z_row, n_mask, g_lo, g_hi, N, plane_stride,
                     kt, y_ptr, ws_ptr, cnt_ptr, m * stride_ym + row0 + offs_n, m * n_tiles + pid_g, pid_k, nsplit, E,
                     BLOCK_N, GPI, SPLIT_K, GPK, WPG, USE_ASM, PF, MMA, A8, rtile, RING, RS, REARLY, rope, ROPE, HD,
                     rstd, RSTD,
                     (f_h, f_w, f_col, f_g0, f_g1, f_g2, fd_h, fd_q, fd_xs, fd_ss, fd_s, fd_w1, fd_ws, pid_n, N),
                     FOLD, FR, FH, FHP, GROUP)


@triton.jit
def _finish_tile(w_row, w_row1, xi_base, xs_base, s_row, z_row, n_mask, g_lo, g_hi, N, plane_stride, kt, y_ptr,
                 ws_ptr, cnt_ptr, y_off, tile, pid_k, nsplit, E: tl.constexpr, BLOCK_N: tl.constexpr,
                 GPI: tl.constexpr, SPLIT_K: tl.constexpr, GPK: tl.constexpr, WPG: tl.constexpr,
                 USE_ASM: tl.constexpr, PF: tl.constexpr, MMA: tl.constexpr, A8: tl.constexpr, rtile,
                 RING: tl.constexpr, RS: tl.constexpr, REARLY: tl.constexpr, rope, ROPE: tl.constexpr,
                 HD: tl.constexpr, rs, RSTD: tl.constexpr, fold, FOLD: tl.constexpr, FR: tl.constexpr,
                 FH: tl.constexpr, FHP: tl.constexpr, GROUP: tl.constexpr):
    """The program's rows at kt slices over groups [g_lo, g_hi), then its share of the split-K reduction: the
    last of the tile's nsplit programs to arrive sums the partials and stores y (y_off: the rows' offsets in y),
    or with ROPE rotates them into q and the caches (``_rope_tile``), or with FOLD computes the next group's input
    (``norm_fold_tile``). RSTD: the sums are scaled by rs (the fold's rstd) first."""
    yv = tl.zeros((BLOCK_N,), tl.float32)
    if kt == 1:
        yv = _row_dots(w_row, w_row1, xi_base, xs_base, s_row, z_row, n_mask, g_lo, g_hi, N,
                       plane_stride, 1, GPI, GPK, WPG, USE_ASM, PF, MMA, A8, rtile, RING, RS, REARLY)
    elif kt == 2:
        if E >= 2:
            yv = _row_dots(w_row, w_row1, xi_base, xs_base, s_row, z_row, n_mask, g_lo, g_hi, N,
                           plane_stride, 2, GPI, GPK, WPG, USE_ASM, PF, MMA, A8, rtile, RING, RS, REARLY)
    elif kt == 3:
        if E >= 3:
            yv = _row_dots(w_row, w_row1, xi_base, xs_base, s_row, z_row, n_mask, g_lo, g_hi, N,
                           plane_stride, 3, GPI, GPK, WPG, USE_ASM, PF, MMA, A8, rtile, RING, RS, REARLY)
    else:
        if E >= 4:
            yv = _row_dots(w_row, w_row1, xi_base, xs_base, s_row, z_row, n_mask, g_lo, g_hi, N,
                           plane_stride, 4, GPI, GPK, WPG, USE_ASM, PF, MMA, A8, rtile, RING, RS, REARLY)
    yv = yv * 16.0
    if RSTD > 0:
        yv = yv * rs
    y_ptrs = y_ptr + y_off
    if SPLIT_K == 1:
        if FOLD:
            _fold_tile(yv, fold, _fold_fc1(fold, FR, FH, FHP, GROUP), FR, FHP, GROUP)
        else:
            tl.store(y_ptrs, yv.to(tl.float16), mask=n_mask)
    else:
        ws = ws_ptr + tile * (SPLIT_K * BLOCK_N) + tl.arange(0, BLOCK_N)
        tl.store(ws + pid_k * BLOCK_N, yv)
        tl.debug_barrier()  # every thread's partial is written before the counter is released
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == nsplit - 1:  # last split of this tile: reduce and reset the counter
            if FOLD:  # the routers' fc1 tiles: in the same round trip as the partials
                fc1 = _fold_fc1(fold, FR, FH, FHP, GROUP)
            tot = tl.zeros((BLOCK_N,), tl.float32)
            for sp in range(nsplit):
                tot += tl.load(ws + sp * BLOCK_N, cache_modifier=".cg")
            if ROPE:
                _rope_tile(tot, ws, nsplit, rope, n_mask, BLOCK_N, HD, USE_ASM)
            elif FOLD:
                _fold_tile(tot, fold, fc1, FR, FHP, GROUP)
            else:
                tl.store(y_ptrs, tot.to(tl.float16), mask=n_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _rstd(ss_ptr, eps, K, T: tl.constexpr):
    """1 / sqrt(sum of the T sums of squares / K + eps) (a NormFold's), summed in a fixed order."""
    ssum = tl.load(ss_ptr)
    for t in tl.static_range(1, T):
        ssum += tl.load(ss_ptr + t)
    return tl.math.rsqrt(ssum / K + eps)


@triton.jit
def _fold_fc1(fold, FR: tl.constexpr, FH: tl.constexpr, FHP: tl.constexpr, GROUP: tl.constexpr):
    h, w, col, g0, g1, g2, h_ptr, q, xs, ss, s, w1, ws, t, K = fold
    return norm_fold_fc1(s, w1, t, K, g0, g1, g2, FR, FH, FHP, GROUP)


@triton.jit
def _fold_tile(y, fold, fc1, FR: tl.constexpr, FHP: tl.constexpr, GROUP: tl.constexpr):
    h, w, col, g0, g1, g2, h_ptr, q, xs, ss, s, w1, ws, t, K = fold
    norm_fold_tile(y, t, h, w, col, fc1, g0, g1, g2, h_ptr, q, xs, ss, ws, K, FR, FHP, GROUP)


@triton.jit
def _rope_tile(tot, ws, nsplit, rope, n_mask, BLOCK_N: tl.constexpr, HD: tl.constexpr, USE_ASM: tl.constexpr):
    """A q/k/v tile's last split, its rows whole heads (BLOCK_N a multiple of HD): what decode_step.rope_kv does
    with the output, without a launch of its own. tot (BN,) are the rows' sums; each is rounded to fp16 as the
    stored y would be, and rotate_half's partner (feature d +- HD/2 of the same head) is summed from the same
    partials in the same order, so it is that y's value too; the rotation is decode_step.rope_term, rounded as
    torch's. Segment 0 (q) goes to q_out, 1 (k) rotated and 2 (v) as it is into the caches at slot pos."""
    cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, q_ptr, S, seg, n0 = rope
    HALF: tl.constexpr = HD // 2
    offs = tl.arange(0, BLOCK_N)
    d = offs % HD
    shift = (d + HALF) % HD - d  # to the partner's row (ws: the rows' own partials of split 0)
    tp = tl.zeros((BLOCK_N,), tl.float32)
    for sp in range(nsplit):
        tp += tl.load(ws + sp * BLOCK_N + shift, cache_modifier=".cg")
    y = tot.to(tl.float16)
    a = y.to(tl.float32)
    b = tp.to(tl.float16).to(tl.float32)
    b = tl.where(d < HALF, -b, b)  # rotate_half(x) = (-x2, x1)
    pos = tl.load(pos_ptr)
    c = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
    s = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
    rot = rope_term(a, b, c, s, tl.float16, USE_ASM).to(tl.float16)
    rows = n0 + offs
    slot = ((rows // HD) * S + pos) * HD + d  # (kv head, pos, d) in a (KV, S, HD) cache
    if seg == 0:
        tl.store(q_ptr + rows, rot, mask=n_mask)
    elif seg == 1:
        tl.store(kc_ptr + slot, rot, mask=n_mask)
    else:
        tl.store(vc_ptr + slot, y, mask=n_mask)


def _has_pdl() -> bool:
    """Whether this triton can launch with programmatic dependent launch (launch_pdl option) on the current GPU
    (Hopper and later): decode_step's cached checks."""
    return _pdl_launch() and _sm90(torch.cuda.current_device())


def default_config_cc(M: int, N: int, K: int, group_size: int) -> dict:
    """Heuristic when no tuned entry exists (fits the H100 sweep in KERNEL_NOTES.md): BLOCK_N 128 on 4 warps, the
    next iteration's words, scales and zero points prefetched, split-K until >= 448 programs (each split >= 2
    groups). Launch configuration hardly mattered in the sweep (within ~10 % across tiles, splits and registers)."""
    bn = 128
    sk = fill_split_k(triton.cdiv(N, bn) * M, K // group_size)
    return dict(BLOCK_N=bn, GPI=1, SPLIT_K=sk, num_warps=4, num_stages=1, PF=1, PDL=1)


def config_cc(M: int, N: int, K: int, group_size: int, int8: bool) -> dict:
    """The launch configuration ``sliced_gemv_cc`` uses when none is given: the tuned entry for the int8 path
    (``sliced_gemv_cc_a8``) where int8 activations have one, else the fp16 path's, else ``default_config_cc``.
    N: the launch's rows (all its weights)."""
    return ((int8 and lookup("sliced_gemv_cc_a8", M, N, K)) or lookup("sliced_gemv_cc", M, N, K)
            or default_config_cc(M, N, K, group_size))


def sliced_gemv_cc(x: torch.Tensor, packed: PackedSlices | list[PackedSlices], k: torch.Tensor | None,
                   out: torch.Tensor | None = None, config: dict | None = None,
                   use_asm: bool | None = None, route: RoutePlan | None = None,
                   x_int8: tuple[torch.Tensor, torch.Tensor] | None = None,
                   rope: tuple[torch.Tensor, ...] | None = None, fold: NormFold | None = None) -> torch.Tensor | None:
    """y (M, N) = x (M, K) · Ŵ_{k_t}ᵀ per token t, for M <= 4 fp16 tokens (v7, CUDA cores). k: (M,) int32.

    ``packed`` may also be a list of 2 or 3 weights of the same input (q/k/v, gate/up: same K, slices and group
    size): one launch computes y = [x Ŵ_1ᵀ, x Ŵ_2ᵀ, ...] (M, N_1 + N_2 + ...), weight s at k[:, s] (k (M, S)). The
    launch configuration is looked up for the total N.

    ``route`` (one token; k is then ignored, None allowed): the counts come from the router launch before this one
    (``router.route_partials``), weight s from router route.r_off + s; each is finished in the kernel and stored
    in route.out.

    ``x_int8`` (an option that changes the numerics): x quantized per group by ``act_int8.quantize_x_int8(x)``,
    (xq (M, K/4) int32, xs (M, G, 2) fp32); every slice count then runs on the int8 tensor cores (``_mma8_loop``)
    and x itself is only checked, not read. Needs groups of 128 and BLOCK_N a multiple of 16 x num_warps. Tuned
    configs: ``sliced_gemv_cc_a8:...`` entries where the int8 path wants another tile, else the fp16 path's.

    ``rope=(cos, sin, pos, k_cache, v_cache)`` (q/k/v of one token: three weights, H·Dh, KV·Dh, KV·Dh rows): returns
    decode_step.rope_kv of the three outputs instead of y, q rotated (H, Dh), k rotated and v written into the
    caches (KV, S, Dh) at slot pos, bit for bit. Where the launch's tiles hold whole heads and it splits K, its last
    splits do that themselves (``_rope_tile``: no launch of the rotary); otherwise rope_kv runs after it.

    ``fold`` (``router.norm_fold``; one weight, one token, BLOCK_N = 128): y is not stored (None is returned);
    each tile's last split adds it to fold.h and computes the next group's int8 codes, sums of squares and router
    partials instead (``_fold_tile``). A ``route`` plan from a fold (``route.rstd``) makes this launch apply its
    rstd (x_int8 then holds the fold's codes; x is only checked).
    """
    packs = list(packed) if isinstance(packed, (list, tuple)) else [packed]
    p0 = packs[0]
    if not 1 <= len(packs) <= 3:
        raise ValueError(f"sliced_gemv_cc takes 1..3 weights, got {len(packs)}")
    if any((p.in_features, p.num_slices, p.group_size) != (p0.in_features, p0.num_slices, p0.group_size)
           for p in packs):
        raise ValueError("the weights of one launch must share K, the slice count and the group size")
    if route is not None:
        if x.dim() != 2 or x.shape[0] != 1:
            raise ValueError(f"sliced_gemv_cc with route takes one token, got x {tuple(x.shape)}")
        if route.r_off + len(packs) > route.out.numel():
            raise ValueError(f"route has {route.out.numel()} routers, the launch needs {route.r_off + len(packs)}")
        k = route.out[:len(packs)].view(1, -1) if len(packs) > 1 else route.out[:1]  # shape only: ROUTE reads none
    if len(packs) > 1:
        if k.dim() != 2 or k.shape[1] != len(packs):
            raise ValueError(f"k must be (M, {len(packs)}) for {len(packs)} weights, got {tuple(k.shape)}")
        k = k.contiguous()
        x, M, _, K = _check_args(x, p0, k[:, 0])
    else:
        x, M, _, K = _check_args(x, p0, k)
    Ns = [p.out_features for p in packs]
    N = sum(Ns)
    if M > MAX_TOKENS_CC:
        raise ValueError(f"sliced_gemv_cc takes 1..{MAX_TOKENS_CC} tokens, got {M}")
    if x.dtype != torch.float16:
        raise TypeError(f"sliced_gemv_cc takes fp16 x, got {x.dtype} (use sliced_gemv)")
    use_asm = (not _interpret()) if use_asm is None else use_asm
    cfg = config or config_cc(M, N, K, p0.group_size, x_int8 is not None)
    BN, GPI, SK = cfg["BLOCK_N"], cfg.get("GPI", 1), cfg["SPLIT_K"]
    G = K // p0.group_size
    SK = split_count(G, min(SK, triton.cdiv(G, GPI)))
    SK12 = split_count(G, min(cfg.get("SPLIT_K12", SK), SK))  # splits at k <= 2 (the grid has SK)
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    q_out, rope_args, HD = None, [y] * 6 + [0], 2
    if rope is not None:
        cos, sin, pos, kc, vc = rope
        KVh, S, HD = kc.shape
        if (len(packs) != 3 or M != 1 or Ns[0] % HD or Ns[1] != KVh * HD or Ns[2] != KVh * HD
                or vc.shape != kc.shape or cos.shape != (S, HD) or sin.shape != cos.shape):
            raise ValueError(f"rope takes q/k/v of one token fitting the caches: outputs {Ns}, {M} token(s), "
                             f"cache {tuple(kc.shape)}, cos {tuple(cos.shape)}")
        if not (SK > 1 and BN % HD == 0 and HD % 2 == 0 and kc.dtype == vc.dtype == torch.float16
                and kc.is_contiguous() and vc.is_contiguous()):  # not fusable here: the rotary launch after it
            y = sliced_gemv_cc(x, packs, k, out, config, use_asm, route, x_int8)
            return rope_kv(y[0, :Ns[0]], y[0, Ns[0]:Ns[0] + Ns[1]], y[0, Ns[0] + Ns[1]:], cos, sin, pos, kc, vc)
        q_out = torch.empty(Ns[0] // HD, HD, dtype=torch.float16, device=x.device)
        rope_args = [cos, sin, pos, kc, vc, q_out, S]
    if fold is not None and (len(packs) != 1 or M != 1 or BN != FOLD_GROUP or fold.h.numel() != N
                             or rope is not None):
        raise ValueError(f"fold takes one weight, one token, tiles of {FOLD_GROUP} rows and an h of its {N} "
                         f"outputs; got {len(packs)} weight(s), {M} token(s), BLOCK_N {BN}, h {fold.h.numel()}")
    rstd = route.rstd if route is not None else None
    if rstd is not None and x_int8 is None:
        raise ValueError("a route plan from a fold (route.rstd) needs x_int8: the fold's codes")
    n_tiles = sum(triton.cdiv(n, BN) for n in Ns)
    ws, cnt = _scratch(x.device, n_tiles * M * SK * BN if SK > 1 else 1, n_tiles * M)
    xi = x.view(torch.int32)  # (M, K/2) fp16 pairs
    pdl = bool(cfg.get("PDL", 0)) and use_asm and _has_pdl()
    # MMA bit k - 1: slice count k on the tensor cores; only for groups of 128 and BLOCK_N a multiple of 16 x warps
    # (a tuned entry is keyed by shape, not group size: otherwise the CUDA-core path, always valid)
    mma_tile = p0.group_size == 128 and BN % (16 * cfg.get("num_warps", 4)) == 0  # what both mma paths need
    full = (1 << p0.num_slices) - 1  # every slice count's bit
    mma = int(cfg.get("MMA", 0)) & full if mma_tile else 0
    # RING bit k - 1: a tensor-core path at k streams its words through shared memory (bulk_ring.py): Hopper's bulk
    # copies, and row counts that are multiples of 8 (s and z move in 16-byte pieces); else the register loads
    ring_ok = use_asm and mma_tile and _sm90(x.device.index) and all(n % 8 == 0 for n in Ns)
    ring = int(cfg.get("RING", 0)) & full & (-1 if x_int8 is not None else mma) if ring_ok else 0
    # REARLY: the first stages' plane 1, s and z issued before the PDL wait; every k must then run on the ring (to
    # consume them) with the same split-K ranges (known before k is). A version for SPLIT_K12 != SPLIT_K that
    # dropped the early stages at k >= 3 measured slower (KERNEL_NOTES.md, "Thirteenth session")
    rearly = bool(cfg.get("REARLY", 0)) and pdl and ring == full and SK12 == SK
    xs = ws  # a placeholder pointer where x is fp16
    if x_int8 is not None:
        if not mma_tile:
            raise ValueError(f"int8 activations need groups of 128 and BLOCK_N a multiple of 16 x num_warps, got "
                             f"group {p0.group_size}, BLOCK_N {BN}, {cfg.get('num_warps', 4)} warps")
        check_x_int8(x_int8, M, K, p0.group_size, x.device)
        xi, xs = x_int8
    rest = []  # weights 2 and 3 (the first one's tensors and N = 0 where absent)
    for i in (1, 2):
        p = packs[i] if i < len(packs) else p0
        rest += [p.qweight, p.scale, p.zero, p.out_features if i < len(packs) else 0, p.qweight[0].numel()]
    if route is not None:
        rm = route.meta
        rargs = route.args() + [route.r_off]
        rconst = dict(ROUTE=True, RH=rm["H"], REM1=rm["EM1"], RHP=rm["HP"], RSPLIT=rm["SPLIT"])
    else:
        rargs = [k] * 10 + [0]
        rconst = dict(ROUTE=False, RH=1, REM1=1, RHP=2, RSPLIT=1)
    if fold is not None:
        fargs = [fold.h, fold.w, fold.xq.view(torch.int8), fold.xs, fold.ss, fold.s, fold.w1,
                 fold.given.view(torch.int8), fold.ws, xdest(x.device)]
        fconst = dict(FOLD=True, FR=fold.w1.shape[0] if fold.routed else 0, FH=fold.w1.shape[1],
                      FHP=max(triton.next_power_of_2(fold.w1.shape[1]), 2))
    else:
        fargs, fconst = [y] * 10, dict(FOLD=False, FR=0, FH=1, FHP=2)
    fargs += [rstd[0], rstd[1]] if rstd is not None else [y, 0.0]
    _sliced_gemv_cc_kernel[(n_tiles, SK, M)](
        xi, y, k, p0.qweight, p0.scale, p0.zero, ws, cnt, xs,
        Ns[0], G, xi.stride(0), y.stride(0), p0.qweight[0].numel(), *rest, *rargs, *rope_args, *fargs,
        E=p0.num_slices, GROUP=p0.group_size, BLOCK_N=BN, GPI=GPI, SPLIT_K=SK, SPLIT_K12=SK12, USE_ASM=use_asm,
        PF=cfg.get("PF", 0), GPK=cfg.get("GPK", 0), PDL=pdl,
        NSEG=len(packs), MMA=mma, A8=x_int8 is not None, RING=ring, REARLY=rearly,
        RS=ring_stages(BN, int(cfg.get("RCAP", 0))) if ring else 1, ROPE=q_out is not None, HD=HD, **rconst,
        **fconst, RSTD=rstd[0].numel() if rstd is not None else 0,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1),
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
        **({"launch_pdl": True} if pdl else {}),
    )
    if fold is not None:
        return None
    return y if q_out is None else q_out


__all__ = ["sliced_gemv_cc", "config_cc", "default_config_cc", "MAX_TOKENS_CC", "asm_cc_text", "asm_xsum_text",
           "asm_mma8_text"]
