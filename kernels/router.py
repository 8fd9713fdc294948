"""Fused decode-time router: the MoBiRoute MLPs of a group of linears that share one input, thresholds and nested
slice counts in one launch (one token).

Shapes (R routers, hidden H, E slices, input K):
    x (K,) fp16/bf16/fp32            the token's input to the linears (q/k/v share one, gate/up another)
    s (R, K)                         each router's input scale (per-channel calibration RMS)
    w1 (R, H, K), b1 (R, H)          fc1;   w2 (R, E-1, H), b2 (R, E-1)   fc2      (any float dtype)
    tau (R,) fp32                    thresholds in force (the engine looks them up from its budget table)
    force_on, force_off (E-1,) bool  band allocation: residual slices always on / always off (both False: nested)
    given (R,) bool, counts_in (R,)  where given, the count is counts_in (uniform / random modes, routerless linears)
    -> counts (R,) int32             n = 1 + Σ_e Π_{j<=e} 1[score_j > τ]      (nested, mobiquant/nn/router.py)

Why a kernel: in torch this is about 16 small launches per group (scale, two matmuls, SiLU, compare, cumprod, ...),
4 groups per LLaMA block, so ~2,000 launches per token for an 8B model; inside a CUDA graph each still costs ~2 µs.
Here it is one launch per group.

Grid (R, SPLIT), SPLIT = cdiv(K, CHUNK_K): program (r, c) multiplies router r's fc1 rows with x / s over its K chunk
(BLOCK_K at a time, fp32) and stores the (HP,) partial in a workspace; the last program of router r to arrive (a
self-resetting counter, as in sliced_gemv_cc's split-K) finishes: ``route_finish`` sums the SPLIT partials one after
the other (so the result does not depend on the arrival order), then b1, SiLU, fc2, the thresholds and the count.
A router whose count is given skips fc1 altogether, its weights not even read (its first program stores counts_in).

``route_partials`` is the same launch without the finishing step (FINISH off: no counter, no last program): the v7
linear launched after it (``sliced_gemv_cc(..., route=plan)``) runs ``route_finish`` itself in each of its programs,
so the router's tail (counter, reload, fc2, count store, the linear's load of the count) leaves the step's critical
path. The counts are route_counts' (same partials, same finishing code; KERNEL_NOTES.md, "fused router").
On Hopper each program first issues ``griddepcontrol.launch_dependents``: the linear that follows (v7, launched with
programmatic dependent launch) may then start and prefetch its weights into L2 while the router runs; it reads the
counts only after its ``griddepcontrol.wait``, which waits for this grid to complete. The router is itself launched
with PDL (``PDL_WAIT``): when its program's K chunk is one tile (the default chunk, ``default_chunk``), it loads
its fc1 tile, input scales and (norm prologue) the norm's weights, constants never written by a kernel, before its
own ``griddepcontrol.wait``, so that load overlaps the kernel before it (the norm, the attention, SiLU·up); so is
the given flag, loaded first (a given router's fc1 tile is masked off: ~78 MB a step at the forced budgets of
LLaMA-3-8B, KERNEL_NOTES.md "Nineteenth session"), which only the host writes (set_budget's copies, before the
graph runs; a kernel before this one that wrote it would not have triggered the launch early: only this package's
kernels do, and none writes it). x, τ, the force flags and every store come after.
With ``x_int8`` (the int8-activation option, act_int8.py), router 0's programs also round their K chunk of x to
int8 per group of 128 and store the codes and (sx, SX) for the linear after them: the option needs no launch of its
own (KERNEL_NOTES.md, "Eleventh session").
A prologue (``route_partials(norm=...)`` or ``silu=``) lets the launch compute x itself from the tensors of the step
before, so that the glue kernel before it is not launched: ``norm=(h, r, w, eps)``, the residual add and RMSNorm of
``decode_step.add_rms_norm`` (each program computes the row's rstd, then its chunk); ``silu=(g, u)``, SiLU·up. Both
run decode_step's own code (``add_rms_rstd``, ``add_rms_norm_tile``, ``silu_mul_tile``, the same warps), so x is bit
for bit the glue kernel's. Router 0's programs store x (and h + r) for the linear and the rest of the step
(KERNEL_NOTES.md, "Twelfth session").
The first version ran one program per router over the whole K. That is a serial chain of K / BLOCK_K dependent
loads, 16 for K = 4096 and 56 for down_proj's K = 14336 (KERNEL_NOTES.md, "router split").
Arithmetic is fp32 like MoBiRoute.forward (summation order differs, so a score within ~1e-6 of τ may fall on the
other side). The pure-torch twin is ``mobiquant.ops.route_counts_ref``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .act_int8 import byte_cols, check_x_int8, quantize_groups, xdest
from .decode_step import (
    ASM_GDC_LAUNCH,
    ASM_GDC_WAIT,
    NORM_WARPS,
    _pdl,
    _pdl_launch,
    add_rms_norm_tile,
    add_rms_rstd,
    decode_attention,
    fc1_partial,
    fc1_tile,
    silu_mul_tile,
)
from .sliced_gemv import _scratch

# K per program by default: the widest power of two from 256 to CHUNK_K that divides K (``default_chunk``), one
# (HP, chunk) tile of fc1 each: 4 programs per router at K = 4096, 14 at 14336. Wider chunks mean fewer partials for
# each routed linear's programs to sum: 1024 took 0.25-0.5 % off the int8 engine's step at budgets 3 and 4 against
# 256, 2048 added 3.5 % (KERNEL_NOTES.md, "Eighteenth session")
CHUNK_K = 1024
MAX_TILE_K = 1024  # the widest chunk a program takes as one tile (a prologue and x_int8 need one tile)
PDL_TRIGGER = True  # let the next kernel (a linear launched with PDL) start early and prefetch its weights
PDL_WAIT = True  # launch with PDL: fc1 loaded before griddepcontrol.wait, overlapping the kernel before
_SCRATCH: dict = {}


def default_chunk(K: int) -> int:
    """In-features per router program when none is asked for: the widest of CHUNK_K, CHUNK_K / 2, .., 256 that
    divides K (so that int8 activations, which quantize whole groups of 128 per program, fit), else 256. A CHUNK_K
    above MAX_TILE_K is taken as it is: each program loops over tiles of 256 (>= K: one program per router)."""
    c = CHUNK_K
    if c > MAX_TILE_K:
        return c
    while c > 256 and K % c:
        c //= 2
    return c


ASM_MUL_RN = tl.constexpr("mul.rn.f32 $0, $1, $2;")


@triton.jit
def sum_partials(ws_r, HP: tl.constexpr, SPLIT: tl.constexpr, CG: tl.constexpr):
    """(HP,) fc1 sums of one router from its SPLIT partials, stored (SPLIT, HP) at ws_r, added one after the other
    (elementwise: the order cannot depend on the layout). CG: read past L1, for partials written by other programs
    of the same grid (the router's last program); v7 reads them after its griddepcontrol.wait, through L1, so that
    the warps and programs of an SM share one L2 read of each line."""
    offs_h = tl.arange(0, HP)
    if CG:
        acc = tl.load(ws_r + offs_h, cache_modifier=".cg")
        for c in tl.static_range(1, SPLIT):
            acc += tl.load(ws_r + c * HP + offs_h, cache_modifier=".cg")
    else:
        acc = tl.load(ws_r + offs_h)
        for c in tl.static_range(1, SPLIT):
            acc += tl.load(ws_r + c * HP + offs_h)
    return acc


@triton.jit
def route_finish(ws_r, b1_ptr, w2_ptr, b2_ptr, tau_ptr, on_ptr, off_ptr, r, H: tl.constexpr, EM1: tl.constexpr,
                 HP: tl.constexpr, SPLIT: tl.constexpr, CG: tl.constexpr, RN: tl.constexpr, scale=1.0,
                 SCALED: tl.constexpr = False):
    """Router r's count (int32 scalar) from its fc1 partials: their sum, b1, SiLU, fc2, the thresholds, the nested
    count. Shared by the router's finishing program and v7's ROUTE prologue, so both give the same count from the
    same partials: every tensor here is one-dimensional (HP,) and comes from a plain load, so it gets the same layout
    in both kernels (one element per thread for HP <= 32 x the warps, KERNEL_NOTES.md "fused router"), and the
    one reduction per score, tl.sum over the HP elements, runs the same shuffle tree in both. Its products are
    rounded by an explicit mul.rn (RN, on the GPU): a product contracted into the first shuffle's add would make
    the butterfly asymmetric, so that the threads of one program could disagree on a score next to τ (seen on the
    H100: counts equal, some rows of v7 at another k).
    SCALED: the partials are fc1 over x / rstd (``NormFold``, the norm's 1 / rms not yet applied): their sum is
    multiplied by ``scale`` (rstd) before b1."""
    offs_h = tl.arange(0, HP)
    h_mask = offs_h < H
    acc = sum_partials(ws_r, HP, SPLIT, CG)
    if SCALED:
        acc = acc * scale
    h = acc + tl.load(b1_ptr + r * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    h = h / (1.0 + tl.exp(-h))  # SiLU; padded units stay 0
    tau = tl.load(tau_ptr + r)
    count = tl.full((), 1, tl.int32)
    run = tl.full((), 1, tl.int32)
    for e in tl.static_range(EM1):  # nested: residual slice e only if every slice before it is on
        w2 = tl.load(w2_ptr + (r * EM1 + e) * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        if RN:
            p = tl.inline_asm_elementwise(ASM_MUL_RN, "=r,r,r", [w2, h], dtype=tl.float32, is_pure=True, pack=1)
        else:
            p = w2 * h
        sc = tl.sum(p, axis=0) + tl.load(b2_ptr + r * EM1 + e).to(tl.float32)
        on = tl.load(on_ptr + e) != 0
        off = tl.load(off_ptr + e) != 0
        run = run * (on | ((sc > tau) & (off == 0))).to(tl.int32)  # score forced to +inf / -inf, else compared
        count = count + run
    return count


@triton.jit
def _route_counts_kernel(
    x_ptr, s_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, tau_ptr, on_ptr, off_ptr, given_ptr, cin_ptr, out_ptr, ws_ptr,
    cnt_ptr, xq_ptr, xs_ptr, dest_ptr, a_ptr, b_ptr, nw_ptr, hout_ptr, xout_ptr, eps, K, CHUNK, H: tl.constexpr,
    EM1: tl.constexpr, HP: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, TRIGGER: tl.constexpr,
    WAIT: tl.constexpr, ONE_TILE: tl.constexpr, FINISH: tl.constexpr, RN: tl.constexpr, QUANT: tl.constexpr,
    PRO: tl.constexpr, HAS_R: tl.constexpr, DP: tl.constexpr,
):
    """PRO: 0 x given; 1 x = norm(a + b) (add_rms_norm: a = h, b = r, nw the norm weight); 2 x = silu(a) * b."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    if TRIGGER:  # the dependent linear (v7, PDL) touches only its weights until its griddepcontrol.wait
        tl.inline_asm_elementwise(ASM_GDC_LAUNCH, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)
    offs_h = tl.arange(0, HP)
    k_lo = c * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    # whether the count is given: written by the host's copies (set_budget, set_k) before the graph runs, never by a
    # kernel of the step, so read before the wait, and first: a given count's fc1 tile is not read
    given_raw = tl.load(given_ptr + r)
    given = given_raw != 0
    if ONE_TILE:  # CHUNK <= BLOCK_K: the program's whole fc1 tile and scales, constants, loaded before the wait
        offs_k1 = k_lo + tl.arange(0, BLOCK_K)
        k_mask1 = offs_k1 < k_hi
        s_t, w_t = fc1_tile(s_ptr, w1_ptr, r, K, H, offs_h, offs_k1, k_mask1, given_raw)  # (BLOCK_K,), (HP, BLOCK_K)
        if PRO == 1:  # the norm's weights
            nw_t = tl.load(nw_ptr + offs_k1, mask=k_mask1, other=0.0)
    if QUANT:  # the codes' byte order, a constant
        col = byte_cols(dest_ptr, 128)
    if WAIT:  # launched with PDL: x, tau, the force flags and the workspace only after the previous grid completed
        tl.inline_asm_elementwise(ASM_GDC_WAIT, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)
    if ONE_TILE:  # the program's K chunk of x: given, or computed by the prologue (router 0 stores it)
        if PRO == 1:
            hc, xv = add_rms_norm_tile(a_ptr, b_ptr, nw_t, offs_k1, k_mask1,
                                       add_rms_rstd(a_ptr, b_ptr, K, eps, HAS_R, DP), HAS_R)
            if r == 0:
                tl.store(hout_ptr + offs_k1, hc, mask=k_mask1)
                tl.store(xout_ptr + offs_k1, xv, mask=k_mask1)
        elif PRO == 2:
            xv = silu_mul_tile(a_ptr, b_ptr, offs_k1, k_mask1)
            if r == 0:
                tl.store(xout_ptr + offs_k1, xv, mask=k_mask1)
        else:
            xv = tl.load(x_ptr + offs_k1, mask=k_mask1, other=0.0)
        if QUANT:  # router 0's programs also write x's int8 codes for the linear after them (groups of 128)
            if r == 0:
                quantize_groups(xv, xq_ptr, xs_ptr, k_lo, col, BLOCK_K // 128, 128)
    if given:  # uniform / random modes, routerless linears: no fc1 to stream
        if FINISH:
            if c == 0:
                tl.store(out_ptr + r, tl.load(cin_ptr + r).to(tl.int32))
    else:
        acc = tl.zeros((HP,), tl.float32)
        if ONE_TILE:
            acc += fc1_partial(w_t, xv, s_t)
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                sv, w = fc1_tile(s_ptr, w1_ptr, r, K, H, offs_h, offs_k, k_mask, given_raw)
                acc += fc1_partial(w, tl.load(x_ptr + offs_k, mask=k_mask, other=0.0), sv)
        ws = ws_ptr + r * (SPLIT * HP)  # router r's partials, (SPLIT, HP): row c is program c's
        tl.store(ws + c * HP + offs_h, acc)
        if FINISH:  # else partials only: the linear after this launch (v7, ROUTE) finishes the count itself
            tl.debug_barrier()  # every thread's part of the partial is written before it is read or released
            last = True
            if SPLIT > 1:  # the last program of router r finishes (the partials in a fixed order) and resets
                arrived = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
                last = arrived == SPLIT - 1
                if last:
                    tl.atomic_xchg(cnt_ptr + r, 0, sem="relaxed", scope="gpu")
            if last:
                tl.store(out_ptr + r, route_finish(ws, b1_ptr, w2_ptr, b2_ptr, tau_ptr, on_ptr, off_ptr, r, H, EM1,
                                                   HP, SPLIT, True, RN))


def _i8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int8) if t.dtype == torch.bool else t


def _shapes(x, s, w1, w2, tau, counts_in, chunk_k, name):
    R, H, K = w1.shape
    EM1 = w2.shape[1]
    if (x is not None and x.numel() != K) or s.shape != (R, K) or w2.shape != (R, EM1, H) or tau.shape != (R,):
        xs = None if x is None else tuple(x.shape)
        raise ValueError(f"{name}: x {xs}, s {tuple(s.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, "
                         f"tau {tuple(tau.shape)} do not fit")
    if counts_in.dtype != torch.int32:
        raise ValueError("counts_in must be int32")
    chunk = min(chunk_k or default_chunk(K), K)
    split = triton.cdiv(K, chunk)
    HP = max(triton.next_power_of_2(H), 2)
    return R, H, K, EM1, chunk, split, HP


@dataclass
class Prologue:
    """The glue a router launch computes its input with (route_partials' norm= / silu=): kind 1 add + RMSNorm of
    a = h, b = r (None: no add), weight w; kind 2 SiLU(a = g) * (b = u). h_out, x_out: where router 0 stores them."""

    kind: int
    a: torch.Tensor
    b: torch.Tensor | None
    x_out: torch.Tensor
    h_out: torch.Tensor | None = None
    w: torch.Tensor | None = None
    eps: float = 0.0


def _prologue(x, norm, silu, K: int, name: str) -> Prologue | None:
    if norm is None and silu is None:
        if x is None:
            raise ValueError(f"{name}: x, norm= or silu= is needed")
        return None
    if x is not None or (norm is not None and silu is not None):
        raise ValueError(f"{name}: give one of x, norm= and silu=")
    if norm is not None:
        h, r, w, eps = norm
        pro = Prologue(1, h, r, torch.empty_like(h), torch.empty_like(h), w, float(eps))
    else:
        g, u = silu
        pro = Prologue(2, g, u, torch.empty_like(g))
    ts = [t for t in (pro.a, pro.b, pro.w) if t is not None]
    if any(t.numel() != K or not t.is_contiguous() or t.device != pro.a.device for t in ts) or \
            pro.a.dtype not in (torch.float16, torch.bfloat16) or (pro.b is not None and pro.b.dtype != pro.a.dtype):
        raise ValueError(f"{name}: the prologue's tensors must be {K} contiguous fp16/bf16 features of one token, "
                         f"got {[(tuple(t.shape), t.dtype) for t in ts]}")
    return pro


def _launch(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in, out, chunk_k, finish, name,
            x_int8=None, pro: Prologue | None = None):
    R, H, K, EM1, chunk, split, HP = _shapes(x, s, w1, w2, tau, counts_in, chunk_k, name)
    block_k = triton.next_power_of_2(chunk) if chunk <= MAX_TILE_K else 256
    if pro is not None:
        if chunk > block_k:
            raise ValueError(f"{name}: a prologue needs a chunk of at most {MAX_TILE_K} in-features, got {chunk}")
        x = pro.x_out
    if x_int8 is not None:  # each program quantizes its whole chunk: whole groups of 128, one tile, no tail
        if chunk % 128 or chunk != block_k or K % chunk:
            raise ValueError(f"{name}: x_int8 needs K ({K}) a multiple of a chunk of 128 to {MAX_TILE_K} "
                             "in-features, a power of two")
        check_x_int8(x_int8, 1, K, 128, x.device)
    xq, xs = (x_int8[0].view(torch.int8), x_int8[1]) if x_int8 is not None else (out, out)
    a = b = nw = hout = x
    if pro is not None:
        a = pro.a
        b = pro.b if pro.b is not None else a
        nw = pro.w if pro.w is not None else a
        hout = pro.h_out if pro.h_out is not None else a
    # the router's own partials and counters: never shared with the linears' split-K counters, whose PDL launches
    # may overlap a router launch
    ws, cnt = _scratch(x.device, R * split * HP, R, store=_SCRATCH)
    pdl = _pdl(x.device)
    wait = PDL_WAIT and pdl and _pdl_launch()
    _route_counts_kernel[(R, split)](
        x.reshape(-1), s, w1, b1, w2, b2, tau, _i8(force_on), _i8(force_off), _i8(given), counts_in, out, ws, cnt,
        xq, xs, xdest(x.device), a, b, nw, hout, x, pro.eps if pro is not None else 0.0, K, chunk, H=H, EM1=EM1,
        HP=HP, BLOCK_K=block_k, SPLIT=split, TRIGGER=PDL_TRIGGER and pdl, WAIT=wait, ONE_TILE=chunk <= block_k,
        FINISH=finish, QUANT=x_int8 is not None, PRO=pro.kind if pro is not None else 0,
        HAS_R=pro is not None and pro.b is not None, DP=triton.next_power_of_2(K),
        RN=x.device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1",
        num_warps=NORM_WARPS,  # the norm prologue's rstd reduces in add_rms_norm's order (decode_step.NORM_WARPS)
        **({"launch_pdl": True} if wait else {}),
    )
    return ws, dict(H=H, EM1=EM1, HP=HP, SPLIT=split)


def route_counts(x: torch.Tensor, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
                 given: torch.Tensor, counts_in: torch.Tensor, out: torch.Tensor | None = None,
                 chunk_k: int | None = None) -> torch.Tensor:
    """counts (R,) int32 for one token (module docstring). All tensors contiguous on x's device. No host sync.
    chunk_k: K per program (default ``default_chunk(K)``; up to MAX_TILE_K one tile, past it a loop over tiles of
    256; >= K: one program per router)."""
    out = torch.empty(w1.shape[0], dtype=torch.int32, device=x.device) if out is None else out
    _launch(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in, out, chunk_k, True, "route_counts")
    return out


@dataclass
class RoutePlan:
    """What v7 needs to finish the counts of R routers whose fc1 partials ``route_partials`` launched: the
    workspace (R, SPLIT, HP) fp32, the routers' fc1 bias and fc2, the thresholds and flags, and ``out`` (R,) int32,
    where the first program of each weight's launch stores its router's count (the count ``route_counts`` gives).
    r_off: the router of the launch's first weight (the multi-weight launch takes routers r_off, r_off + 1, ...)."""

    ws: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    tau: torch.Tensor
    force_on: torch.Tensor
    force_off: torch.Tensor
    given: torch.Tensor
    counts_in: torch.Tensor
    out: torch.Tensor
    meta: dict = field(default_factory=dict)
    r_off: int = 0
    x: torch.Tensor | None = None  # the launch's input (K,): x, or what its prologue computed (norm=, silu=)
    h: torch.Tensor | None = None  # norm=: h + r (K,), the residual stream after the add
    rstd: tuple | None = None  # (ss (T,) fp32, eps): x is the norm's input times its weight, its 1 / rms not applied
    # (NormFold): the linear finishes rstd = 1 / sqrt(sum(ss) / K + eps) and scales its sums and fc1's by it

    def args(self) -> list:
        return [self.ws, self.b1, self.w2, self.b2, self.tau, _i8(self.force_on), _i8(self.force_off),
                _i8(self.given), self.counts_in, self.out]


def route_partials(x: torch.Tensor | None, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
                   given: torch.Tensor, counts_in: torch.Tensor, out: torch.Tensor | None = None,
                   chunk_k: int | None = None, x_int8: tuple[torch.Tensor, torch.Tensor] | None = None,
                   norm: tuple | None = None, silu: tuple | None = None) -> RoutePlan:
    """The first half of ``route_counts``: the same launch with FINISH off, so its programs only store their fc1
    partials (a router whose count is given stores nothing); no counter, no last program. The linear launched next
    (``sliced_gemv_cc(..., route=plan)``) sums them, finishes fc2 and the thresholds in each program and stores the
    counts in ``plan.out`` (default: a new (R,) int32 tensor): equal to ``route_counts``' on the same inputs, since
    both run ``sum_partials`` and ``route_finish`` on the same partials. The workspace is this module's, reused by
    the next router launch: the linear must run before it (in one stream, with PDL or not, it does).

    ``x_int8``: buffers (xq (1, K/4) int32, xs (1, K/128, 2) fp32) that router 0's programs fill with x quantized
    per group of 128 (act_int8.quantize_x_int8's codes), for a linear launched with ``x_int8=`` after this launch:
    so the int8 path needs no quantizer launch of its own.

    ``norm=(h, r, w, eps)`` (x None): x = w * rmsnorm(h + r) (r None: no add), as ``decode_step.add_rms_norm``
    computes it, bit for bit; ``plan.x`` and ``plan.h`` (= h + r) are new tensors that router 0 fills.
    ``silu=(g, u)`` (x None): x = silu(g) * u, as ``decode_step.silu_mul``; ``plan.x``. Either saves the step the
    glue kernel's launch; the chunk must be at most MAX_TILE_K features (the default is)."""
    if w1.shape[1] > 64:  # route_finish's layout argument: at most one hidden unit per thread of a 2-warp program
        raise ValueError(f"route_partials: router hidden size {w1.shape[1]} above 64")
    pro = _prologue(x, norm, silu, w1.shape[2], "route_partials")
    out = torch.empty(w1.shape[0], dtype=torch.int32, device=s.device) if out is None else out
    ws, meta = _launch(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in, out, chunk_k, False,
                       "route_partials", x_int8, pro)
    return RoutePlan(ws, b1, w2, b2, tau, force_on, force_off, given, counts_in, out, meta,
                     x=x if pro is None else pro.x_out, h=None if pro is None else pro.h_out)


_FOLD_SCRATCH: dict = {}


@dataclass
class NormFold:
    """The add + RMSNorm, int8 codes and router fc1 partials of a group's input (q/k/v, gate/up), computed by the
    linear before it (o_proj, down_proj: ``sliced_gemv_cc(..., fold=)``) in the last split of each tile of 128
    rows, so that no router launch runs between them. Per tile t (group t of the next input):

        h[t] += y[t]                            in place, rounded to fp16 as torch's h + r
        v = w[t] * h[t]                         fp32: the norm's output times rms(h), the same in every group
        xq, (sx, SX) = int8 codes of v          act_int8's rounding; sx carries no 1 / rms
        ss[t] = sum h[t]^2                      fp32
        ws[r, t] = fc1_r partial over v / s_r   each router r of the group whose count is not given

    ``plan`` is the group's RoutePlan: its launch (``sliced_gemv_cc(h, ..., route=plan, x_int8=(xq, xs))``) sums ss
    in a fixed order, rstd = 1 / sqrt(sum / K + eps), and multiplies its dot products and fc1's sums by rstd, which
    is exact algebra: every group's codes scale by the same factor. The numerics differ from the router launch's
    norm prologue only in roundings (v is not rounded to fp16 before its codes, and fc1 sums over 128-feature
    partials)."""

    h: torch.Tensor
    w: torch.Tensor
    xq: torch.Tensor
    xs: torch.Tensor
    ss: torch.Tensor
    s: torch.Tensor
    w1: torch.Tensor
    given: torch.Tensor
    ws: torch.Tensor
    plan: RoutePlan
    routed: bool = True  # False: no router partials (the all-given modes' graph, DecodeEngine.norm_fold)


FOLD_GROUP = 128  # features per tile of the linear that computes a NormFold: one int8 group


def norm_fold(h: torch.Tensor, w: torch.Tensor, eps: float, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
              given: torch.Tensor, counts_in: torch.Tensor, out: torch.Tensor,
              x_int8: tuple[torch.Tensor, torch.Tensor], routed: bool = True) -> NormFold:
    """A ``NormFold`` for the group whose routers are (s, w1, ..., counts_in) and whose input is w * rmsnorm(h + y),
    y the output of the linear launched with ``fold=`` (h: (K,) fp16, updated in place there). x_int8: the codes'
    buffers (not the ones the folding linear reads: it writes these while its other tiles still read its own).
    The workspace (ss, ws) is this module's, shared by every fold: the group's launch must run before the next
    folding linear (in one stream, with PDL or not, it does). routed False: the fold stores no router partials
    (every count of the group must then be given)."""
    R, H, K = w1.shape
    if h.numel() != K or w.numel() != K or h.dtype != torch.float16 or not (h.is_contiguous() and w.is_contiguous()):
        raise ValueError(f"norm_fold: h and w must be {K} contiguous features, h fp16; got {tuple(h.shape)} "
                         f"{h.dtype}, {tuple(w.shape)}")
    if K % FOLD_GROUP or H > 64:
        raise ValueError(f"norm_fold: K ({K}) a multiple of {FOLD_GROUP}, router hidden size at most 64")
    check_x_int8(x_int8, 1, K, FOLD_GROUP, h.device)
    _shapes(None, s, w1, w2, tau, counts_in, FOLD_GROUP, "norm_fold")
    T, HP = K // FOLD_GROUP, max(triton.next_power_of_2(H), 2)
    buf, _ = _scratch(h.device, R * T * HP + T, 1, store=_FOLD_SCRATCH)
    ws, ss = buf[:R * T * HP], buf[R * T * HP:R * T * HP + T]
    plan = RoutePlan(ws, b1, w2, b2, tau, force_on, force_off, given, counts_in, out,
                     dict(H=H, EM1=w2.shape[1], HP=HP, SPLIT=T), x=h, h=h, rstd=(ss, float(eps)))
    return NormFold(h, w, x_int8[0], x_int8[1], ss, s, w1, given, ws, plan, routed)


def route_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, window: int,
                    scaling: float, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
                    given: torch.Tensor, counts_in: torch.Tensor, out: torch.Tensor | None = None,
                    x_int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> RoutePlan:
    """``decode_step.decode_attention`` with o_proj's router launch folded into its epilogue: program h, which
    computes head h's output, o_proj's in-features [h Dh, (h + 1) Dh), also stores the router's fc1 partial over them
    (and with ``x_int8`` their int8 codes: Dh = 128, one group). The result is ``route_partials(o, ...,
    chunk_k=Dh)``'s plan with o as ``plan.x``: the v7 launch after it finishes the count (``sliced_gemv_cc(...,
    route=plan)``). Both kernels run decode_step.fc1_partial on decode_step.fc1_tile's tiles in the same layout, so
    the partials are the same sums in the interpreter; on the H100 most differ in their last bit, and not because of
    the products' or the division's rounding (KERNEL_NOTES.md, "Eighteenth session"), so a score within ~1e-8 of τ
    may fall on either side, as between this kernel and torch. One router (o_proj's); its hidden size at most 64;
    Dh a power of two from 16 to 256."""
    DH = k_cache.shape[-1]
    R, H, K = w1.shape
    if R != 1 or K != q.numel() or q.numel() % DH or DH & (DH - 1) or not 16 <= DH <= 256 or H > 64:
        raise ValueError(f"route_attention: one router over the {q.numel()} attention outputs, heads of a power of "
                         f"two from 16 to 256 features, hidden size at most 64; got w1 {tuple(w1.shape)}, heads of "
                         f"{DH}")
    _shapes(None, s, w1, w2, tau, counts_in, DH, "route_attention")
    if x_int8 is not None:
        if DH != 128:
            raise ValueError(f"route_attention: x_int8 needs heads of 128 features (one group each), got {DH}")
        check_x_int8(x_int8, 1, K, 128, q.device)
    split, HP = K // DH, max(triton.next_power_of_2(H), 2)
    out = torch.empty(R, dtype=torch.int32, device=q.device) if out is None else out
    ws, _ = _scratch(q.device, split * HP, R, store=_SCRATCH)  # the router launches' workspace, as route_partials
    xq, xs = (x_int8[0].view(torch.int8), x_int8[1]) if x_int8 is not None else (None, None)
    o = decode_attention(q, k_cache, v_cache, pos, window, scaling, router=(s, w1, _i8(given), ws, HP, xq, xs))
    return RoutePlan(ws, b1, w2, b2, tau, force_on, force_off, given, counts_in, out,
                     dict(H=H, EM1=w2.shape[1], HP=HP, SPLIT=split), x=o)


__all__ = ["route_counts", "route_partials", "route_attention", "norm_fold", "NormFold", "RoutePlan", "CHUNK_K",
           "default_chunk"]
