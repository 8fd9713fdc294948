"""A program's weight tile streamed into shared memory by the copy engine: a ring of stages, one group each.

Why (benchmarks/KERNEL_NOTES.md, "Thirteenth session"): the batch-1 kernels (v8, v10) load each group's words, s_1
and z_1 into registers one group ahead. In the group-major layout (layout.py) a tile's rows of one group are one
contiguous block per plane, and s_1, z_1 of those rows are contiguous too, so a group is KS + 2 bulk copies
(``cp.async.bulk``, Hopper's TMA engine without a tensor map) that take no registers and no threads. What that buys
is not depth (two stages measured faster than four or eight: more bytes in flight only lengthened every program's
wait for its first group) but a start before the PDL wait: the copies of the first stages need neither x nor k, so a
program issues them while the kernel before it still runs (REARLY), and with int8 activations the decode engine's
step dropped 16 % at budget 2.

One stage (one group of the tile, BN rows; bytes), the same at every k so that stages can be issued before k is read:

    plane 1 words (BN, 8) int32 | plane 2 | plane 3 | plane 4 | s_1 (BN,) fp16 | z_1 (BN,) fp16      132 BN bytes

Protocol (every thread runs the helpers; thread 0 issues, everyone waits):

    ring = ring_base()                 once per kernel: the static shared buffer (RING_BYTES) and its barriers
    ring_init(ring, S)                 thread 0 initialises one mbarrier per stage; then a CTA barrier
    ring_issue(ring, slot, ..., PART)  thread 0: the slot's barrier expects the bytes, the copies complete on it.
                                       PART 0: a whole stage (KS planes, s, z); 1: plane 1, s and z without the
                                       stage's arrival (before k is known); 2: the rest of such a stage (planes
                                       2..KS) and the arrival
    ring_wait(ring, slot, parity)      every thread: until the slot's copies have landed (phase parity of its use)
    ring_words / ring_sz               the tile's fragments from the slot (ld.shared, in the register path's layout)
    (a CTA barrier before a slot is issued again: every warp has read it; that barrier also orders those reads
    before the copy engine's writes, as an mbarrier does in CUTLASS's pipelines, so no proxy fence is issued)

Constraints: a plane's rows are 32 bytes each (always whole 16-byte pieces); s and z need the rows copied to be a
multiple of 8 (bulk copies move multiples of 16 bytes from 16-byte aligned addresses), so the launcher turns the
ring off for weights whose row count is not a multiple of 8. Rows past the weight's end are not copied; their lanes
read stale shared memory and compute rows that are never stored. RING_BYTES (36 KB, static) holds two stages of 128
rows or four of 64.

No interpreter path: TRITON_INTERPRET cannot run PTX, and the kernels fall back to their register loads there
(``USE_ASM=False``). The GPU tests compare the ring against those loads bit for bit
(tests/kernels/test_bulk_ring.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

_RING = 36864  # bytes of the stages: min(_STAGES, _RING // (132 BN)) of them
_STAGES = 8  # at most; one mbarrier (8 bytes) each, after the stages
RING_BYTES = tl.constexpr(_RING)

ASM_RING_BASE = tl.constexpr(
    "{\n"
    f".shared .align 128 .b8 mq_ring[{_RING + 8 * _STAGES}];\n"
    "mov.u32 $0, mq_ring;\n"
    "}")
ASM_RING_INIT = tl.constexpr(  # one stage's barrier, one arrival per phase
    "{\n.reg .pred p;\n.reg .u32 t;\nmov.u32 t, %tid.x;\nsetp.eq.u32 p, t, 0;\n"
    "@p mbarrier.init.shared::cta.b64 [$1], 1;\nmov.u32 $0, 0;\n}")
ASM_RING_INIT_FENCE = tl.constexpr(
    "{\n.reg .pred p;\n.reg .u32 t;\nmov.u32 t, %tid.x;\nsetp.eq.u32 p, t, 0;\n"
    "@p fence.mbarrier_init.release.cluster;\nmov.u32 $0, 0;\n}")
ASM_RING_WAIT = tl.constexpr(
    "{\n.reg .pred p;\nRING_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;\n@p bra RING_DONE;\n"
    "bra RING_WAIT;\nRING_DONE:\nmov.u32 $0, 0;\n}")
ASM_LDS_W2 = tl.constexpr("ld.shared.v2.b32 {$0, $1}, [$2];")
ASM_LDS_SZ = tl.constexpr("ld.shared.u16 $0, [$2];\nld.shared.u16 $1, [$3];")


def asm_ring_issue_text(e0: int, e1: int, sz: bool, arrive: bool) -> str:
    """PTX (thread 0 only): copies of planes e0 .. e1 - 1 ($3 bytes each) and, with ``sz``, of s_1 and z_1 ($4 bytes
    each) into a stage, completing on its barrier $1; the barrier first expects $2 more bytes, with ``arrive`` also
    counting the stage's one arrival (its phase completes once arrived and every expected byte has landed).
    Operands: $0 out, $1 barrier, $2 bytes, $3 plane bytes, $4 s/z bytes, $5..$10 shared destinations (planes 1..4,
    s, z), $11..$16 global sources (same order); the ones not copied are ignored."""
    # No proxy fence before the copies: the threads' reads of the stage were ordered before them by the CTA
    # barrier (as CUTLASS's pipelines order a consumer's reads before the producer's next TMA by an mbarrier); a
    # fence.proxy.async here compiled to MEMBAR.ALL.CTA, which made thread 0 wait for its own pending x loads.
    L = ["{", ".reg .pred p;", ".reg .u32 t;", "mov.u32 t, %tid.x;", "setp.eq.u32 p, t, 0;",
         "@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [$1], $2;" if arrive
         else "@p mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$1], $2;"]
    for i in list(range(e0, e1)) + ([4, 5] if sz else []):
        L.append(f"@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [${5 + i}], [${11 + i}], "
                 f"{'$3' if i < 4 else '$4'}, [$1];")
    L += ["mov.u32 $0, 0;", "}"]
    return "\n".join(L)


ASM_ISSUE_ALL_1 = tl.constexpr(asm_ring_issue_text(0, 1, True, True))  # a whole stage at KS slices
ASM_ISSUE_ALL_2 = tl.constexpr(asm_ring_issue_text(0, 2, True, True))
ASM_ISSUE_ALL_3 = tl.constexpr(asm_ring_issue_text(0, 3, True, True))
ASM_ISSUE_ALL_4 = tl.constexpr(asm_ring_issue_text(0, 4, True, True))
ASM_ISSUE_EARLY = tl.constexpr(asm_ring_issue_text(0, 1, True, False))  # before k is known: plane 1, s, z
ASM_ISSUE_REST_1 = tl.constexpr(asm_ring_issue_text(1, 1, False, True))  # then the arrival and planes 2..KS
ASM_ISSUE_REST_2 = tl.constexpr(asm_ring_issue_text(1, 2, False, True))
ASM_ISSUE_REST_3 = tl.constexpr(asm_ring_issue_text(1, 3, False, True))
ASM_ISSUE_REST_4 = tl.constexpr(asm_ring_issue_text(1, 4, False, True))
ISSUE_CONS = tl.constexpr("=r" + ",r" * 10 + ",l" * 6)


def ring_stages(block_n: int, cap: int = 0) -> int:
    """Stages of the ring for BN rows, at most ``cap`` (0: no cap): the kernel's RS."""
    s = min(_STAGES, _RING // (132 * block_n))
    return min(s, cap) if cap else s


@triton.jit
def ring_base():
    """The ring's shared address (u32 scalar). Call once per kernel: every call declares another buffer."""
    z = tl.full((1,), 0, tl.int32)
    return tl.max(tl.inline_asm_elementwise(ASM_RING_BASE, "=r,r", [z], dtype=tl.int32, is_pure=False, pack=1), 0)


@triton.jit
def ring_init(ring, S: tl.constexpr):
    """Thread 0 initialises the barriers of the S stages; a CTA barrier makes them visible before any use."""
    z1 = tl.zeros((1,), tl.int32)
    for i in tl.static_range(S):
        tl.inline_asm_elementwise(ASM_RING_INIT, "=r,r", [ring + RING_BYTES + 8 * i + z1], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.inline_asm_elementwise(ASM_RING_INIT_FENCE, "=r,r", [z1], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def ring_issue(ring, slot, g, w_ptr, s_ptr, z_ptr, n0, rows, N, plane_stride, KS: tl.constexpr, BN: tl.constexpr,
               PART: tl.constexpr):
    """Thread 0: group g of the tile (rows n0 .. n0 + rows, rows <= BN) into stage ``slot`` (group-major words:
    plane e, group g, row n0 at ((e G + g) N + n0) 8 words; s_1, z_1 at g N + n0). PART 0: the whole stage at KS
    slices; 1: plane 1, s and z only, without the arrival (issued before k is known, e.g. before the PDL wait);
    2: the rest of a stage issued with PART 1 (planes 2..KS and the arrival)."""
    SB: tl.constexpr = 132 * BN
    z1 = tl.zeros((1,), tl.int32)
    dst = ring + slot * SB + z1
    bar = ring + RING_BYTES + slot * 8 + z1
    off = g * N + n0
    wb = rows * 32
    sb = rows * 2
    if PART == 0:
        tx = KS * wb + 2 * sb
    elif PART == 1:
        tx = wb + 2 * sb
    else:
        tx = (KS - 1) * wb
    w0 = (w_ptr + off * 8 + z1).to(tl.int64, bitcast=True)
    args = [bar, tx, wb, sb, dst, dst + 32 * BN, dst + 64 * BN, dst + 96 * BN, dst + 128 * BN, dst + 130 * BN,
            w0, w0 + 4 * plane_stride, w0 + 8 * plane_stride, w0 + 12 * plane_stride,
            (s_ptr + off + z1).to(tl.int64, bitcast=True), (z_ptr + off + z1).to(tl.int64, bitcast=True)]
    if PART == 1:
        tl.inline_asm_elementwise(ASM_ISSUE_EARLY, ISSUE_CONS, args, dtype=tl.int32, is_pure=False, pack=1)
    elif KS == 1:
        tl.inline_asm_elementwise(ASM_ISSUE_ALL_1 if PART == 0 else ASM_ISSUE_REST_1, ISSUE_CONS, args,
                                  dtype=tl.int32, is_pure=False, pack=1)
    elif KS == 2:
        tl.inline_asm_elementwise(ASM_ISSUE_ALL_2 if PART == 0 else ASM_ISSUE_REST_2, ISSUE_CONS, args,
                                  dtype=tl.int32, is_pure=False, pack=1)
    elif KS == 3:
        tl.inline_asm_elementwise(ASM_ISSUE_ALL_3 if PART == 0 else ASM_ISSUE_REST_3, ISSUE_CONS, args,
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(ASM_ISSUE_ALL_4 if PART == 0 else ASM_ISSUE_REST_4, ISSUE_CONS, args,
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def ring_wait(ring, slot, parity):
    """Every thread: until stage ``slot``'s copies of this use (phase ``parity``) have landed."""
    z1 = tl.zeros((1,), tl.int32)
    tl.inline_asm_elementwise(ASM_RING_WAIT, "=r,r,r", [ring + RING_BYTES + slot * 8 + z1, parity + z1],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def ring_words(ring, slot, offs, KS: tl.constexpr, BN: tl.constexpr):
    """Words of chunks 2t, 2t + 1 (BN, 4) of each plane from stage ``slot``, as the register path's
    ``_load_words_mma`` returns them (unused planes repeat plane 1). offs (BN, 4): row r, chunk 2t at 32 r + 8 t
    bytes (the caller's, so that the tile keeps the layout of the tensors it meets)."""
    SB: tl.constexpr = 132 * BN
    a = ring + slot * SB + offs
    wa0, wb0 = tl.inline_asm_elementwise(ASM_LDS_W2, "=r,=r,r", [a], dtype=(tl.int32, tl.int32), is_pure=False,
                                         pack=1)
    wa1, wb1, wa2, wb2, wa3, wb3 = wa0, wb0, wa0, wb0, wa0, wb0
    if KS > 1:
        wa1, wb1 = tl.inline_asm_elementwise(ASM_LDS_W2, "=r,=r,r", [a + 32 * BN], dtype=(tl.int32, tl.int32),
                                             is_pure=False, pack=1)
    if KS > 2:
        wa2, wb2 = tl.inline_asm_elementwise(ASM_LDS_W2, "=r,=r,r", [a + 64 * BN], dtype=(tl.int32, tl.int32),
                                             is_pure=False, pack=1)
    if KS > 3:
        wa3, wb3 = tl.inline_asm_elementwise(ASM_LDS_W2, "=r,=r,r", [a + 96 * BN], dtype=(tl.int32, tl.int32),
                                             is_pure=False, pack=1)
    return wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3


@triton.jit
def ring_sz(ring, slot, rows2, KS: tl.constexpr, BN: tl.constexpr):
    """s_1, z_1 from stage ``slot``: the fp16 bits in int32, as ``_load_sz_mma`` returns them; rows2: 2 r, shaped
    as the tile (BN, 4) so that the values land in its layout (a (BN, 1) result would get one of its own and a
    conversion through shared memory every group; the quad's four lanes read the same address)."""
    SB: tl.constexpr = 132 * BN
    a = ring + slot * SB + 128 * BN + rows2
    s, z = tl.inline_asm_elementwise(ASM_LDS_SZ, "=r,=r,r,r", [a, a + 2 * BN], dtype=(tl.int32, tl.int32),
                                     is_pure=False, pack=1)
    return s, z
