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
self-resetting counter, as in sliced_gemv_cc's split-K) sums the SPLIT partials as one (SP, HP) tile, in a fixed
order, so the result does not depend on the arrival order, and finishes fc2, the thresholds and the count in
registers. A router whose count is given skips fc1 altogether (its first program stores counts_in).
On Hopper each program first issues ``griddepcontrol.launch_dependents``: the linear that follows (v7, launched with
programmatic dependent launch) may then start and prefetch its weights into L2 while the router runs; it reads the
counts only after its ``griddepcontrol.wait``, which waits for this grid to complete. The router is itself launched
with PDL (``PDL_WAIT``): when its program's K chunk is one tile (the engine's CHUNK_K = BLOCK_K = 256), it loads
its fc1 tile and input scales (constants, never written by a kernel) before its own ``griddepcontrol.wait``, so that
load overlaps the kernel before it (the norm, the attention, SiLU·up); x, τ, the flags and every store come after.
The first version ran one program per router over the whole K. That is a serial chain of K / BLOCK_K dependent
loads, 16 for K = 4096 and 56 for down_proj's K = 14336 (KERNEL_NOTES.md, "router split").
Arithmetic is fp32 like MoBiRoute.forward (summation order differs, so a score within ~1e-6 of τ may fall on the
other side). The pure-torch twin is ``mobiquant.ops.route_counts_ref``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .sliced_gemv import _scratch

CHUNK_K = 256  # K per program: one (HP, BLOCK_K) tile of fc1 each, 16 programs per router at K = 4096
PDL_TRIGGER = True  # let the next kernel (a linear launched with PDL) start early and prefetch its weights
PDL_WAIT = True  # launch with PDL: fc1 loaded before griddepcontrol.wait, overlapping the kernel before
_SCRATCH: dict = {}
ASM_GDC_LAUNCH = tl.constexpr("griddepcontrol.launch_dependents;\nmov.u32 $0, 0;")
ASM_GDC_WAIT = tl.constexpr("griddepcontrol.wait;\nmov.u32 $0, 0;")


@triton.jit
def _route_counts_kernel(
    x_ptr, s_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, tau_ptr, on_ptr, off_ptr, given_ptr, cin_ptr, out_ptr, ws_ptr,
    cnt_ptr, K, CHUNK, H: tl.constexpr, EM1: tl.constexpr, HP: tl.constexpr, EP: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, SP: tl.constexpr, TRIGGER: tl.constexpr, WAIT: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    r = tl.program_id(0)
    c = tl.program_id(1)
    if TRIGGER:  # the dependent linear (v7, PDL) touches only its weights until its griddepcontrol.wait
        tl.inline_asm_elementwise(ASM_GDC_LAUNCH, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)
    offs_h = tl.arange(0, HP)
    h_mask = offs_h < H
    k_lo = c * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    if ONE_TILE:  # CHUNK <= BLOCK_K: the program's whole fc1 tile and scales, constants, loaded before the wait
        offs_k1 = k_lo + tl.arange(0, BLOCK_K)
        k_mask1 = offs_k1 < k_hi
        s_t = tl.load(s_ptr + r * K + offs_k1, mask=k_mask1, other=1.0).to(tl.float32)
        w_t = tl.load(w1_ptr + r * H * K + offs_h[:, None] * K + offs_k1[None, :],
                      mask=h_mask[:, None] & k_mask1[None, :], other=0.0).to(tl.float32)  # (HP, BLOCK_K)
    if WAIT:  # launched with PDL: x, tau, the flags and the workspace only after the previous grid completed
        tl.inline_asm_elementwise(ASM_GDC_WAIT, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)
    given = tl.load(given_ptr + r) != 0
    if given:  # uniform / random modes, routerless linears: no fc1 to stream
        if c == 0:
            tl.store(out_ptr + r, tl.load(cin_ptr + r).to(tl.int32))
    else:
        acc = tl.zeros((HP,), tl.float32)
        if ONE_TILE:
            xv = tl.load(x_ptr + offs_k1, mask=k_mask1, other=0.0).to(tl.float32)
            acc += tl.sum(w_t * (xv / s_t)[None, :], axis=1)
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                xv = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                sv = tl.load(s_ptr + r * K + offs_k, mask=k_mask, other=1.0).to(tl.float32)
                w = tl.load(w1_ptr + r * H * K + offs_h[:, None] * K + offs_k[None, :],
                            mask=h_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # (HP, BLOCK_K)
                acc += tl.sum(w * (xv / sv)[None, :], axis=1)
        last = True
        if SPLIT > 1:  # partial -> workspace; the last program of router r reduces (fixed order) and resets
            ws = ws_ptr + r * (SP * HP)
            tl.store(ws + c * HP + offs_h, acc)
            tl.debug_barrier()  # every thread's part of the partial is written before the counter is released
            arrived = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
            last = arrived == SPLIT - 1
            if last:
                offs_s = tl.arange(0, SP)
                part = tl.load(ws + offs_s[:, None] * HP + offs_h[None, :], mask=(offs_s < SPLIT)[:, None],
                               other=0.0, cache_modifier=".cg")  # (SP, HP)
                acc = tl.sum(part, axis=0)
                tl.atomic_xchg(cnt_ptr + r, 0, sem="relaxed", scope="gpu")
        if last:
            h = acc + tl.load(b1_ptr + r * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
            h = h / (1.0 + tl.exp(-h))  # SiLU; padded units stay 0
            offs_e = tl.arange(0, EP)
            e_mask = offs_e < EM1
            w2 = tl.load(w2_ptr + r * EM1 * H + offs_e[:, None] * H + offs_h[None, :],
                         mask=e_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)  # (EP, HP)
            sc = tl.sum(w2 * h[None, :], axis=1)
            sc += tl.load(b2_ptr + r * EM1 + offs_e, mask=e_mask, other=0.0).to(tl.float32)
            tau = tl.load(tau_ptr + r)
            on = tl.load(on_ptr + offs_e, mask=e_mask, other=0) != 0
            off = tl.load(off_ptr + offs_e, mask=e_mask, other=0) != 0
            alive = (on | ((sc > tau) & (off == 0))).to(tl.int32)  # (EP,): score forced to +inf / -inf, else compared
            count = 1
            run = 1
            for e in tl.static_range(EM1):  # nested: residual slice e only if every slice before it is on
                run = run * tl.sum(tl.where(offs_e == e, alive, 0), axis=0)
                count = count + run
            tl.store(out_ptr + r, count.to(tl.int32))


def _pdl(device) -> bool:
    """Whether griddepcontrol can be issued: a Hopper (or later) GPU, not the interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _sm90(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=1)
def _pdl_launch() -> bool:
    """Whether this triton launches with programmatic dependent launch (the launch_pdl option)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_pdl" in CUDAOptions.__dataclass_fields__
    except Exception:  # noqa: BLE001
        return False


@functools.lru_cache(maxsize=16)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _i8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int8) if t.dtype == torch.bool else t


def route_counts(x: torch.Tensor, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
                 given: torch.Tensor, counts_in: torch.Tensor, out: torch.Tensor | None = None,
                 chunk_k: int | None = None) -> torch.Tensor:
    """counts (R,) int32 for one token (module docstring). All tensors contiguous on x's device. No host sync.
    chunk_k: K per program (default CHUNK_K, a multiple of BLOCK_K = 256 unless smaller; >= K: one per router)."""
    R, H, K = w1.shape
    EM1 = w2.shape[1]
    if x.numel() != K or s.shape != (R, K) or w2.shape != (R, EM1, H) or tau.shape != (R,):
        raise ValueError(f"route_counts: x {tuple(x.shape)}, s {tuple(s.shape)}, w1 {tuple(w1.shape)}, "
                         f"w2 {tuple(w2.shape)}, tau {tuple(tau.shape)} do not fit")
    if counts_in.dtype != torch.int32:
        raise ValueError("counts_in must be int32")
    out = torch.empty(R, dtype=torch.int32, device=x.device) if out is None else out
    chunk = min(chunk_k or CHUNK_K, K)
    block_k = min(256, triton.next_power_of_2(chunk))
    split = triton.cdiv(K, chunk)
    HP = max(triton.next_power_of_2(H), 2)
    SP = max(triton.next_power_of_2(split), 2)
    # the router's own partials and counters: never shared with the linears' split-K counters, whose PDL launches
    # may overlap a router launch
    ws, cnt = _scratch(x.device, R * SP * HP if split > 1 else 1, R, store=_SCRATCH)
    pdl = _pdl(x.device)
    wait = PDL_WAIT and pdl and _pdl_launch()
    _route_counts_kernel[(R, split)](
        x.reshape(-1), s, w1, b1, w2, b2, tau, _i8(force_on), _i8(force_off), _i8(given), counts_in, out, ws, cnt,
        K, chunk, H=H, EM1=EM1, HP=HP, EP=max(triton.next_power_of_2(EM1), 2), BLOCK_K=block_k, SPLIT=split, SP=SP,
        TRIGGER=PDL_TRIGGER and pdl, WAIT=wait, ONE_TILE=chunk <= block_k, num_warps=4,
        **({"launch_pdl": True} if wait else {}),
    )
    return out


__all__ = ["route_counts", "CHUNK_K"]
