"""The small kernels of one decode step (one token), fused: what sits between the linears of a LLaMA block.

The decode engine (mobiquant/engine.py) ran this glue as HF's modules and plain torch ops: per block two RMSNorms of
~7 launches each, two residual adds, rotary embedding (~5 launches each for q and k), two cache writes, attention
over the static cache (~7 launches) and SiLU·up (2), about 40 launches per block and 1,300 per token. Inside a CUDA
graph each costs 2-3 µs whatever its size (KERNEL_NOTES.md, "decode step profile"). Here the same functions take 5
launches per block (2 where the router launches compute the norms and SiLU·up: router.py's prologue runs the
``*_tile`` helpers below):

    add_rms_norm(h, r, w, eps)   h' = h + r (the residual add, optional); x = w * rmsnorm(h')      (D,) -> (D,), (D,)
    rope_kv(q, k, v, cos, sin, pos, k_cache, v_cache)
                                 q, k rotated at position pos (HF's rotate_half convention); k and v written into
                                 the caches at pos; returns q rotated                        (H*Dh,) -> (H, Dh)
    decode_attention(q, k_cache, v_cache, pos, window, scaling)
                                 one query per head against cache slots j <= pos (and j > pos - window), GQA
                                 (head h reads kv head h // (H / KV))                          (H, Dh) -> (H*Dh,)
                                 (router.route_attention: the same launch, o_proj's router partials and int8
                                 codes in its epilogue)
    silu_mul(g, u)               silu(g) * u                                                    (N,) -> (N,)
    greedy_step(logits, out, tok, pos, ws)
                                 the step's tail: out = logits in fp32, tok = the first argmax, pos += 1     (V,)

Rounding follows the torch code they replace, step by step, so that the fused step matches the unfused one to
rounding of sums: every fp16/bf16 result of torch (a product, a sum, the normalised activation, the attention
score out of the q·k matmul, the softmax probabilities) is rounded to the activation dtype at the same place here;
the math in between is fp32, as torch's. What differs is the order of the fp32 sums (mean of squares, dot
products, softmax sum), so results agree to ~1 ulp of the activation dtype, not bit for bit.

Tensors are contiguous, on one device; pos is a device tensor (int64, one element), read by the kernels, so that a
captured graph replays at any position. The pure-torch twins are in mobiquant/ops.py.

Programmatic dependent launch (``PDL``, Hopper, not the interpreter): each kernel is launched with ``launch_pdl`` and
starts with ``griddepcontrol.launch_dependents`` then ``griddepcontrol.wait``. So the kernel after it (the next glue
kernel, the router, a v7 linear) may be scheduled while it waits or runs, and its own launch overlaps the tail of the
kernel before it; ``wait`` returns once the previous grid has completed and its writes are visible (KERNEL_NOTES.md,
"glue and router PDL"). Before the wait a kernel reads only what no kernel of the step writes: the norm its
weights; the rotary its position and cos / sin rows; the attention its position and the first block's keys and
values at the slots before pos, which earlier steps wrote (the rotary before it writes slot pos only). Every store,
and every read of what the kernels before it write, comes after the wait.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .act_int8 import byte_cols, quantize_group, quantize_groups, xdest

PDL = True  # launch the glue kernels with programmatic dependent launch where the GPU and triton allow it
# the norm weights, the rotary's cos / sin rows and the attention's first block of keys and values loaded before
# griddepcontrol.wait (KERNEL_NOTES.md, "Fourteenth session"); off: after it
EARLY_LOADS = True
ASM_GDC_ENTER = tl.constexpr("griddepcontrol.launch_dependents;\ngriddepcontrol.wait;\nmov.u32 $0, 0;")
ASM_GDC_LAUNCH = tl.constexpr("griddepcontrol.launch_dependents;\nmov.u32 $0, 0;")
ASM_GDC_WAIT = tl.constexpr("griddepcontrol.wait;\nmov.u32 $0, 0;")


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (its writes visible): before any global access."""
    if PDL:
        tl.inline_asm_elementwise(ASM_GDC_ENTER, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _pdl_enter_early(EARLY: tl.constexpr, PDL: tl.constexpr):
    """EARLY: let the next kernel launch and return; the kernel loads what no kernel of the step writes, then calls
    ``_pdl_wait_early``. Else ``_pdl_enter``."""
    if EARLY:
        if PDL:
            tl.inline_asm_elementwise(ASM_GDC_LAUNCH, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)
    else:
        _pdl_enter(PDL)


@triton.jit
def _pdl_wait_early(EARLY: tl.constexpr, PDL: tl.constexpr):
    """The wait that ``_pdl_enter_early(EARLY)`` left out."""
    if EARLY:
        if PDL:
            tl.inline_asm_elementwise(ASM_GDC_WAIT, "=r,r", [tl.full((1,), 0, tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)


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


def _pdl_opts(t: torch.Tensor) -> dict:
    """Launch options: PDL on where it can run (the kernel's PDL constexpr and triton's launch_pdl together)."""
    on = PDL and _pdl(t.device) and _pdl_launch()
    return dict(PDL=on, **({"launch_pdl": True} if on else {}))


# ------------------------------------------------------------------------------------------ add + RMSNorm
NORM_CHUNK = 256  # features per program of add_rms_norm (x does not depend on it: each computes the row's rstd)
NORM_WARPS = 8  # add_rms_norm and the router kernel: the same warps, so add_rms_rstd reduces in the same order
# (8 or 2: 0.7 % off the 8B step against 4; KERNEL_NOTES.md, "Twelfth session")


@triton.jit
def add_rms_rstd(h_ptr, r_ptr, D, eps, HAS_R: tl.constexpr, DP: tl.constexpr):
    """1 / rms(h + r) over the whole row (fp32 scalar), h + r rounded to the activation dtype as torch's add.
    Shared by add_rms_norm and the router's norm prologue (router.py), launched with the same warps (NORM_WARPS),
    so that both reduce in the same order and give the same bits."""
    offs = tl.arange(0, DP)
    mask = offs < D
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    if HAS_R:
        h = (h.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(h.dtype)
    hf = h.to(tl.float32)
    return tl.math.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)


@triton.jit
def add_rms_norm_tile(h_ptr, r_ptr, w, offs, mask, rstd, HAS_R: tl.constexpr):
    """(h + r, w * (h + r) * rstd) at offs, both in the activation dtype, rounded as HF's LlamaRMSNorm. w: the
    norm weight at offs, loaded by the caller before its griddepcontrol.wait (a constant of the model)."""
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    if HAS_R:  # residual add, rounded to the activation dtype as torch's h + r
        h = (h.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(h.dtype)
    n = (h.to(tl.float32) * rstd).to(h.dtype)  # HF: hidden_states.to(input_dtype), then weight * it
    return h, (w.to(tl.float32) * n.to(tl.float32)).to(h.dtype)


@triton.jit
def _add_rms_norm_kernel(h_ptr, r_ptr, w_ptr, h_out_ptr, x_out_ptr, D, eps, HAS_R: tl.constexpr,
                         DP: tl.constexpr, CHUNK: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr):
    """Program c: the whole row's rstd, then features [c * CHUNK, (c + 1) * CHUNK) (their norm weights loaded
    before the wait)."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < D
    _pdl_enter_early(PRE, PDL)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    _pdl_wait_early(PRE, PDL)
    rstd = add_rms_rstd(h_ptr, r_ptr, D, eps, HAS_R, DP)
    h, x = add_rms_norm_tile(h_ptr, r_ptr, w, offs, mask, rstd, HAS_R)
    tl.store(h_out_ptr + offs, h, mask=mask)
    tl.store(x_out_ptr + offs, x, mask=mask)


def add_rms_norm(h: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + r, w * rmsnorm(h + r)) for one token h (..., D); r None: no add (the first output is a copy of h)."""
    D = h.shape[-1]
    if h.numel() != D or (r is not None and r.numel() != D) or w.numel() != D:
        raise ValueError(f"add_rms_norm: one token of {D} features, got h {tuple(h.shape)}, w {tuple(w.shape)}")
    h_out = torch.empty_like(h)
    x_out = torch.empty_like(h)
    chunk = min(NORM_CHUNK, triton.next_power_of_2(D))
    _add_rms_norm_kernel[(triton.cdiv(D, chunk),)](h, r if r is not None else h, w, h_out, x_out, D, float(eps),
                                                   HAS_R=r is not None, DP=triton.next_power_of_2(D), CHUNK=chunk,
                                                   PRE=EARLY_LOADS, num_warps=NORM_WARPS, **_pdl_opts(h))
    return h_out, x_out


# ------------------------------------------------------------------------------------------ a router's fc1 partial
@triton.jit
def fc1_tile(s_ptr, w1_ptr, r, K, H: tl.constexpr, offs_h, offs_k, k_mask, given):
    """Router r's input scales (BK,) and fc1 columns (HP, BK) fp32 at the in-features offs_k: constants of the model,
    loaded before griddepcontrol.wait. s (R, K), w1 (R, H, K) (router.py); padded hidden units and in-features 0.
    given: the router's given flag (a scalar): a given router's tile is not read (scales 1, columns 0; ~78 MB a step
    at LLaMA-3-8B's forced budgets, KERNEL_NOTES.md "Nineteenth session")."""
    k_mask = k_mask & (offs_k * 0 + given.to(tl.int32) == 0)  # a tensor operand: the interpreter's masks need one
    s_t = tl.load(s_ptr + r * K + offs_k, mask=k_mask, other=1.0).to(tl.float32)
    w_t = tl.load(w1_ptr + r * H * K + offs_h[:, None] * K + offs_k[None, :],
                  mask=(offs_h < H)[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    return s_t, w_t


@triton.jit
def fc1_partial(w_t, xv, s_t):
    """(HP,) fp32: fc1 over one chunk of in-features, sum_k w1[:, k] x_k / s_k. The router kernel (router.py) and
    the attention's epilogue (below) both call it on tiles from ``fc1_tile``: the same sums, in the same order."""
    return tl.sum(w_t * (xv.to(tl.float32) / s_t)[None, :], axis=1)


@triton.jit
def _max_and_sum(a0, b0, a1, b1):
    return tl.maximum(a0, a1), b0 + b1


@triton.jit
def norm_fold_fc1(s_ptr, w1_ptr, t, K, g0, g1, g2, R: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                  GROUP: tl.constexpr):
    """The fc1 tiles (decode_step.fc1_tile) of up to 3 routers over group t (R = 0: none), none read for a router
    whose given flag (g0, g1, g2) is set: loaded by norm_fold_tile's caller before the split-K sums, so that they
    come in the same round trip."""
    offs = t * GROUP + tl.arange(0, GROUP)
    offs_h = tl.arange(0, HP)
    s0 = 0
    w0 = 0
    if R > 0:
        s0, w0 = fc1_tile(s_ptr, w1_ptr, 0, K, H, offs_h, offs, offs < K, g0)
    s1, w1 = s0, w0
    s2, w2 = s0, w0
    if R > 1:
        s1, w1 = fc1_tile(s_ptr, w1_ptr, 1, K, H, offs_h, offs, offs < K, g1)
    if R > 2:
        s2, w2 = fc1_tile(s_ptr, w1_ptr, 2, K, H, offs_h, offs, offs < K, g2)
    return s0, w0, s1, w1, s2, w2


@triton.jit
def norm_fold_tile(y, t, h, w, col, fc1, g0, g1, g2, h_ptr, xq_ptr, xs_ptr, ss_ptr, ws_ptr, K,
                   R: tl.constexpr, HP: tl.constexpr, GROUP: tl.constexpr):
    """Group t of the next norm's input from y (GROUP,) fp32, a linear's output rows [t GROUP, (t + 1) GROUP):
    router.NormFold's step (the residual add, stored in place, the int8 codes of w * h, the sum of squares, the
    fc1 partials of the R <= 3 routers whose count is not given). Run by the tile's last split (sliced_gemv_cc's
    fold=). h, w: the tile's h (loaded after the PDL wait) and norm weights; col: ``byte_cols``; fc1:
    ``norm_fold_fc1``'s tiles; every load is the caller's, so that nothing here waits on memory behind a store."""
    offs = t * GROUP + tl.arange(0, GROUP)
    hn = (h.to(tl.float32) + y.to(tl.float16).to(tl.float32)).to(tl.float16)
    hf = hn.to(tl.float32)
    v = w.to(tl.float32) * hf
    s0, w0, s1, w1, s2, w2 = fc1
    T = K // GROUP
    offs_h = tl.arange(0, HP)
    if R > 0:
        if g0 == 0:
            tl.store(ws_ptr + t * HP + offs_h, fc1_partial(w0, v, s0))
    if R > 1:
        if g1 == 0:
            tl.store(ws_ptr + (T + t) * HP + offs_h, fc1_partial(w1, v, s1))
    if R > 2:
        if g2 == 0:
            tl.store(ws_ptr + (2 * T + t) * HP + offs_h, fc1_partial(w2, v, s2))
    tl.store(h_ptr + offs, hn)
    amax, ss = tl.reduce((tl.abs(v), hf * hf), 0, _max_and_sum)  # one pass across the warps for both
    quantize_group(v, amax, xq_ptr, xs_ptr, t * GROUP, col, GROUP)
    tl.store(ss_ptr + t, ss)


# ------------------------------------------------------------------------------------------ rotary + cache write
# a * c + b * s with each product and the sum rounded to fp16, in PTX (fp32 in and out)
ASM_ROPE_F16 = tl.constexpr(
    "{ .reg .f32 rt_p, rt_q; .reg .b16 rt_h;\n"
    "mul.rn.f32 rt_p, $1, $2; cvt.rn.f16.f32 rt_h, rt_p; cvt.f32.f16 rt_p, rt_h;\n"
    "mul.rn.f32 rt_q, $3, $4; cvt.rn.f16.f32 rt_h, rt_q; cvt.f32.f16 rt_q, rt_h;\n"
    "add.rn.f32 rt_p, rt_p, rt_q; cvt.rn.f16.f32 rt_h, rt_p; cvt.f32.f16 $0, rt_h; }")


@triton.jit
def rope_term(a, b, c, s, dt, USE_ASM: tl.constexpr):
    """a * cos + b * sin (b: rotate_half's partner, negated in the first half), fp32 in and out, rounded as torch's
    x * cos + rotate_half(x) * sin in dt: each product, then the sum. USE_ASM (fp16, on the GPU) computes it in PTX,
    for kernels compiled with fp contraction (the q/k/v linear's rotary, sliced_gemv_cc), which would otherwise fuse a
    product into the sum and skip its rounding; the rotary kernel below is compiled without contraction."""
    if USE_ASM:
        return tl.inline_asm_elementwise(ASM_ROPE_F16, "=r,r,r,r,r", [a, c, b, s], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return ((a * c).to(dt).to(tl.float32) + (b * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, q_out_ptr, S,
                    H: tl.constexpr, KV: tl.constexpr, DH: tl.constexpr, HALF_P: tl.constexpr, PRE: tl.constexpr,
                    PDL: tl.constexpr):
    """Program i: query head i (i < H), key head i - H (rotated, cached), value head i - H - KV (cached).
    PRE: pos and the cos / sin rows (never written by a kernel of the step) are loaded before griddepcontrol.wait."""
    i = tl.program_id(0)
    _pdl_enter_early(PRE, PDL)
    pos = tl.load(pos_ptr)
    HALF: tl.constexpr = DH // 2
    offs = tl.arange(0, HALF_P)
    mask = offs < HALF
    c1 = tl.load(cos_ptr + pos * DH + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * DH + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * DH + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * DH + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    _pdl_wait_early(PRE, PDL)
    if i < H + KV:
        if i < H:
            src = q_ptr + i * DH
        else:
            src = k_ptr + (i - H) * DH
        x1 = tl.load(src + offs, mask=mask, other=0.0)  # first half of the head
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
        dt = x1.dtype
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = rope_term(a1, -a2, c1, s1, dt, False).to(dt)
        y2 = rope_term(a2, a1, c2, s2, dt, False).to(dt)
        if i < H:
            dst = q_out_ptr + i * DH
        else:
            dst = kc_ptr + ((i - H) * S + pos) * DH
        tl.store(dst + offs, y1, mask=mask)
        tl.store(dst + HALF + offs, y2, mask=mask)
    else:
        j = i - H - KV
        dst = vc_ptr + (j * S + pos) * DH
        tl.store(dst + offs, tl.load(v_ptr + j * DH + offs, mask=mask), mask=mask)
        tl.store(dst + HALF + offs, tl.load(v_ptr + j * DH + HALF + offs, mask=mask), mask=mask)


def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """q (H*Dh) rotated -> (H, Dh); k rotated and v written into k_cache / v_cache (KV, S, Dh) at slot pos.
    cos, sin: (S, Dh) tables; pos: (1,) int64 on the device."""
    KV, S, DH = k_cache.shape
    H = q.numel() // DH
    if q.numel() != H * DH or k.numel() != KV * DH or v.numel() != KV * DH or cos.shape != (S, DH) or DH % 2:
        raise ValueError(f"rope_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, cache {tuple(k_cache.shape)}, "
                         f"cos {tuple(cos.shape)} do not fit")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_kv: the caches must be contiguous")
    q_out = torch.empty(H, DH, dtype=q.dtype, device=q.device)
    # enable_fp_fusion=False: the compiler narrows (fp16 product).to(fp16) + ... to fp16 math and would then
    # contract product and sum into one fma, skipping the product's rounding that torch does
    _rope_kv_kernel[(H + 2 * KV,)](q, k, v, cos, sin, pos, k_cache, v_cache, q_out, S, H=H, KV=KV, DH=DH,
                                   HALF_P=triton.next_power_of_2(DH // 2), PRE=EARLY_LOADS, num_warps=1,
                                   enable_fp_fusion=False, **_pdl_opts(q))
    return q_out


# ------------------------------------------------------------------------------------------ attention
# cache slots a program's block holds (fewer for heads above 128 features) and its warps: 128 on 8 took 2.3 % off
# the 8B step against 64 on 4 (fewer dependent loads per pass; KERNEL_NOTES.md, "Twelfth session")
ATTN_SLOTS = 128
ATTN_WARPS = 8


@triton.jit
def _attn_scores(kt, qf, valid, scaling, dt):
    """(BLOCK_S,) fp32 scores of one block: the q·k matmul's output rounded to dt, scaled; -inf where not valid."""
    return tl.where(valid, tl.sum(kt * qf[None, :], axis=1).to(dt).to(tl.float32) * scaling, float("-inf"))


@triton.jit
def _attn_max_sum(m, l, sc):
    """Per-lane running max and sum of exp after one block of scores."""
    m_new = tl.maximum(m, sc)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no valid slot yet: exp(-inf) = 0
    return m_new, l * tl.exp(m - m_ref) + tl.exp(sc - m_ref)


@triton.jit
def _decode_attention_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, S, WINDOW, scaling,
                             rs_ptr, rw1_ptr, rgiven_ptr, rws_ptr, xq_ptr, xs_ptr, dest_ptr, G: tl.constexpr,
                             DH: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr, PRE: tl.constexpr,
                             PDL: tl.constexpr, ROUTE: tl.constexpr, RH: tl.constexpr, RHP: tl.constexpr,
                             QUANT: tl.constexpr):
    """Program h: query head h against kv head h // G, two passes over the valid slots (max and sum, then the
    probabilities rounded to the activation dtype as torch's softmax(...).to(dtype), times V).
    PRE: the first block's keys and values at the slots before pos are loaded before griddepcontrol.wait. Those
    slots were written by earlier steps; the kernels this one may overlap (the rotary before it writes slot pos) do
    not write them. Slot pos, q and every store come after the wait. The first block's scores and values stay in
    registers for the second pass, so its keys are read once.
    Epilogue for o_proj's router (router.route_attention), the output of head h being o_proj's in-features
    [h DH, (h + 1) DH): ROUTE stores the router's fc1 partial over them (decode_step.fc1_partial, as the router
    launch would with chunks of DH) at rws (SPLIT = heads, RHP), unless its count is given; QUANT (DH = 128, one
    group) stores their int8 codes and (sx, SX) at xq, xs (act_int8.quantize_groups). The router's tiles and given
    flag are constants, loaded before the wait."""
    h = tl.program_id(0)
    kv = h // G
    offs_d = tl.arange(0, DP)
    d_mask = offs_d < DH
    kbase = kc_ptr + kv * S * DH
    vbase = vc_ptr + kv * S * DH
    _pdl_enter_early(PRE, PDL)
    pos = tl.load(pos_ptr).to(tl.int32)  # written by the step before (never by a kernel this one overlaps)
    lo = tl.where(WINDOW > 0, tl.maximum(pos - WINDOW + 1, 0), 0)
    start = (lo // BLOCK_S) * BLOCK_S
    offs_s = start + tl.arange(0, BLOCK_S)
    tile = offs_s[:, None] * DH + offs_d[None, :]
    early = (offs_s >= lo) & (offs_s < pos)
    k0 = tl.load(kbase + tile, mask=early[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_S, DP)
    v0 = tl.load(vbase + tile, mask=early[:, None] & d_mask[None, :], other=0.0)
    if ROUTE:  # o_proj's router: its given flag, and unless given its input scales and fc1 columns for this head
        r_given = tl.load(rgiven_ptr)
        r_s, r_w = fc1_tile(rs_ptr, rw1_ptr, 0, tl.num_programs(0) * DH, RH, tl.arange(0, RHP), h * DH + offs_d,
                            d_mask, r_given)
    if QUANT:  # the codes' byte order, a constant
        col = byte_cols(dest_ptr, DH)
    _pdl_wait_early(PRE, PDL)
    q = tl.load(q_ptr + h * DH + offs_d, mask=d_mask, other=0.0)
    dt = q.dtype
    qf = q.to(tl.float32)
    at_pos = (offs_s == pos)[:, None] & d_mask[None, :]  # slot pos: written by the rotary just before
    k0 = tl.load(kbase + tile, mask=at_pos, other=k0).to(tl.float32)  # slot pos loaded into k0, no select
    v0 = tl.load(vbase + tile, mask=at_pos, other=v0).to(tl.float32)
    valid0 = (offs_s >= lo) & (offs_s <= pos)
    sc0 = _attn_scores(k0, qf, valid0, scaling, dt)
    m, l = _attn_max_sum(tl.full((BLOCK_S,), float("-inf"), tl.float32), tl.zeros((BLOCK_S,), tl.float32), sc0)
    for j0 in range(start + BLOCK_S, pos + 1, BLOCK_S):
        offs_s = j0 + tl.arange(0, BLOCK_S)
        valid = offs_s <= pos
        kt = tl.load(kbase + offs_s[:, None] * DH + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                     other=0.0).to(tl.float32)  # (BLOCK_S, DP)
        m, l = _attn_max_sum(m, l, _attn_scores(kt, qf, valid, scaling, dt))
    m_all = tl.max(m, axis=0)  # finite: slot pos is always valid
    l_all = tl.sum(l * tl.exp(m - m_all), axis=0)
    p = (tl.exp(sc0 - m_all) / l_all).to(dt).to(tl.float32)  # masked slots: exp(-inf) = 0
    acc = tl.zeros((DP,), tl.float32)
    acc += tl.sum(p[:, None] * v0, axis=0)
    for j0 in range(start + BLOCK_S, pos + 1, BLOCK_S):
        offs_s = j0 + tl.arange(0, BLOCK_S)
        valid = offs_s <= pos
        mk = valid[:, None] & d_mask[None, :]
        kt = tl.load(kbase + offs_s[:, None] * DH + offs_d[None, :], mask=mk, other=0.0).to(tl.float32)
        p = (tl.exp(_attn_scores(kt, qf, valid, scaling, dt) - m_all) / l_all).to(dt).to(tl.float32)
        vt = tl.load(vbase + offs_s[:, None] * DH + offs_d[None, :], mask=mk, other=0.0).to(tl.float32)
        acc += tl.sum(p[:, None] * vt, axis=0)
    o = acc.to(dt)
    tl.store(o_ptr + h * DH + offs_d, o, mask=d_mask)
    if QUANT:
        quantize_groups(o, xq_ptr, xs_ptr, h * DH, col, 1, DH)
    if ROUTE:
        if r_given == 0:
            tl.store(rws_ptr + h * RHP + tl.arange(0, RHP), fc1_partial(r_w, o, r_s))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int, scaling: float, router: tuple | None = None) -> torch.Tensor:
    """o (H*Dh,) of one token: q (H, Dh) against the cache slots pos - window < j <= pos (window 0: all j <= pos).
    router: the epilogue of o_proj's router, (s (1, K), w1 (1, RH, K), given (1,) int8, ws fp32 (its first H RHP
    elements: (H, RHP)), RHP, xq int8 or None, xs or None), checked by router.route_attention, which builds it."""
    KV, S, DH = k_cache.shape
    H = q.numel() // DH
    if q.numel() != H * DH or H % KV or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)} do not fit")
    o = torch.empty(H * DH, dtype=q.dtype, device=q.device)
    DP = triton.next_power_of_2(DH)
    s = w1 = given = ws = xq = xs = o  # unused pointers without the epilogue
    RH = RHP = 1
    if router is not None:
        s, w1, given, ws, RHP, xq, xs = router
        RH = w1.shape[1]
    quant = router is not None and xq is not None
    _decode_attention_kernel[(H,)](q, k_cache, v_cache, pos, o, S, int(window or 0), float(scaling), s, w1, given,
                                   ws, xq if quant else o, xs if quant else o, xdest(q.device) if quant else o,
                                   G=H // KV, DH=DH, DP=DP, BLOCK_S=max(16, min(ATTN_SLOTS, ATTN_SLOTS * 128 // DP)),
                                   PRE=EARLY_LOADS, ROUTE=router is not None, RH=RH, RHP=RHP, QUANT=quant,
                                   num_warps=ATTN_WARPS, **_pdl_opts(q))
    return o


# ------------------------------------------------------------------------------------------ SiLU · up
@triton.jit
def silu_mul_tile(g_ptr, u_ptr, offs, mask):
    """silu(g) * u at offs in the activation dtype, rounded as torch's act_fn(g) * u (also the router's prologue)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # act_fn(g), rounded as torch's silu
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (a * u).to(g.dtype)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(y_ptr + offs, silu_mul_tile(g_ptr, u_ptr, offs, mask), mask=mask)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, elementwise (same shapes)."""
    if g.shape != u.shape:
        raise ValueError(f"silu_mul: g {tuple(g.shape)} and u {tuple(u.shape)} differ")
    if not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError("silu_mul: g and u must be contiguous")
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    N = g.numel()
    BLOCK = 1024
    _silu_mul_kernel[(triton.cdiv(N, BLOCK),)](g, u, y, N, BLOCK=BLOCK, num_warps=4, **_pdl_opts(g))
    return y


# ------------------------------------------------------------------------------------------ greedy tail
GREEDY_BLOCK = 1024  # logits per program: 126 programs for LLaMA-3's 128256


@triton.jit
def _greedy_step_kernel(l_ptr, out_ptr, tok_ptr, pos_ptr, wv_ptr, wi_ptr, cnt_ptr, V, NP,
                        BLOCK: tl.constexpr, NPP: tl.constexpr, PDL: tl.constexpr):
    """Program p: logits [p BLOCK, (p + 1) BLOCK) to fp32, and their first maximum (value, index) stored at wv[p],
    wi[p]; the last program to arrive (a self-resetting counter, as the split-K kernels') reduces the NP partials
    in index order, stores the token and advances the position. NaN ranks as +inf (torch's argmax: above every
    number)."""
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    v = tl.load(l_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    tl.store(out_ptr + offs, v, mask=mask)
    key = tl.where(v != v, float("inf"), v)
    m = tl.max(key, axis=0)
    tl.store(wv_ptr + pid, m)
    tl.store(wi_ptr + pid, tl.min(tl.where(key == m, offs, V), axis=0))  # the first index holding it
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == NP - 1:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
        o = tl.arange(0, NPP)
        valid = o < NP
        mv = tl.load(wv_ptr + o, mask=valid, other=float("-inf"), cache_modifier=".cg")
        mi = tl.load(wi_ptr + o, mask=valid, other=V, cache_modifier=".cg")
        best = tl.max(mv, axis=0)
        tl.store(tok_ptr, tl.min(tl.where(mv == best, mi, V), axis=0).to(tl.int64))
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)


def greedy_workspace(V: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (P,) fp32, indices (P,) int32, counter (1,) int32 = 0) for ``greedy_step`` over V logits."""
    P = triton.cdiv(V, GREEDY_BLOCK)
    return (torch.empty(P, dtype=torch.float32, device=device), torch.empty(P, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def greedy_step(logits: torch.Tensor, out: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor,
                ws: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """The decode step's tail in one launch: out (V,) fp32 = logits (V,); tok (1,) int64 = the index of the first
    maximum (a NaN ranks as +inf: above every number, as in torch's argmax); pos (1,) int64 += 1.
    ws: ``greedy_workspace(V)``, its counter at 0 (the kernel leaves it so)."""
    V = logits.numel()
    wv, wi, cnt = ws
    P = triton.cdiv(V, GREEDY_BLOCK)
    if out.numel() != V or out.dtype != torch.float32 or wv.numel() < P or wi.numel() < P or V >= 2**31:
        raise ValueError(f"greedy_step: {V} logits, out {tuple(out.shape)} {out.dtype}, workspace {wv.numel()}")
    if tok.dtype != torch.int64 or pos.dtype != torch.int64 or not logits.is_contiguous():
        raise ValueError("greedy_step: tok and pos are int64 device tensors, logits contiguous")
    _greedy_step_kernel[(P,)](logits, out, tok, pos, wv, wi, cnt, V, P, BLOCK=GREEDY_BLOCK,
                              NPP=triton.next_power_of_2(P), num_warps=4, **_pdl_opts(logits))


__all__ = ["add_rms_norm", "rope_kv", "decode_attention", "silu_mul", "greedy_step", "greedy_workspace"]
