"""``torch.library`` custom ops over the Triton kernels: what MoBiQuantLinear and the decode engine call on CUDA.

    y = torch.ops.mobiquant.sliced_linear(x, qweight, scale, zero, k, bias, group_size)   # x (..., K) -> (..., N)
    y = torch.ops.mobiquant.sliced_linear_multi(x, qweights, scales, zeros, k, bias, group_size)  # q/k/v at once
    c = torch.ops.mobiquant.route_counts(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in)

Registered as custom ops with fake (meta) implementations, so ``torch.compile`` traces through them without a graph
break and CUDA graphs capture them like any aten op (house style §1.3–1.4: hqq and gemlite do the same). The real
implementations launch the kernels of ``mobiquant.kernels`` (imported lazily, on the first call: registering the ops
imports neither triton nor initialises CUDA, so ``import mobiquant`` stays light). On a CPU tensor without
``TRITON_INTERPRET=1`` they run the pure-torch references instead, which compute the same functions.

``sliced_linear`` arguments are the tensors of a ``mobiquant.kernels.PackedSlices`` (kernel layout: qweight
(E, G, N, g/16) int32, scale and zero (G, N) fp16) plus k, each token's slice count (int32, shaped like x[..., 0],
values clamped to 1..E by the kernel: no host-side check, so no synchronisation). Kernel constraints
(``kernel_compatible``): 2-bit slices, E <= 4, K % 16 == 0, group size % 32 == 0, x in fp16 or bf16.

``route_counts`` is the fused decode-time router of a group of linears that share one input (q/k/v, gate/up): the
MoBiRoute MLPs, the thresholds and the nested counts in one launch (``mobiquant.kernels.router``).

The decode step's glue between the linears (``mobiquant.kernels.decode_step``, one token):

    h, x = torch.ops.mobiquant.add_rms_norm(h, r, w, eps)                       # h + r, w * rmsnorm(h + r)
    q = torch.ops.mobiquant.rope_kv(q, k, v, cos, sin, pos, k_cache, v_cache)   # rotary; k, v into the caches
    o = torch.ops.mobiquant.decode_attention(q, k_cache, v_cache, pos, window, scaling)
    a = torch.ops.mobiquant.silu_mul(g, u)

Their pure-torch twins (``*_ref``) are the torch code the decode engine runs without them.
"""

from __future__ import annotations

import os

import torch

SLICE_BITS = 2
MAX_SLICES = 4


def kernel_compatible(slice_bits, in_features: int, group_size: int) -> bool:
    """Whether a sliced linear of this configuration has a kernel (else the torch path serves it)."""
    return (all(b == SLICE_BITS for b in slice_bits) and 1 <= len(slice_bits) <= MAX_SLICES
            and in_features % 16 == 0 and group_size % 32 == 0)


_HAS_TRITON: bool | None = None


def triton_available() -> bool:
    """True when triton can be imported (checked once, on first use: never at ``import mobiquant``)."""
    global _HAS_TRITON
    if _HAS_TRITON is None:
        try:
            import triton  # noqa: F401

            _HAS_TRITON = True
        except ImportError:
            _HAS_TRITON = False
    return _HAS_TRITON


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    return triton_available() and (x.is_cuda or _interpret())


# ------------------------------------------------------------------------------------------------ sliced_linear
@torch.library.custom_op("mobiquant::sliced_linear", mutates_args=())
def sliced_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: torch.Tensor,
                  bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """y (..., N) = x (..., K) Ŵ_{k_t}ᵀ (+ bias), Ŵ_k from the first k slices in the kernels' layout."""
    from mobiquant.kernels.layout import PackedSlices

    packed = PackedSlices(qweight, scale, zero, group_size)
    k = k.to(torch.int32)
    if _use_triton(x):
        from mobiquant.kernels.dispatch import sliced_linear as launch

        return launch(x, packed, k, bias)
    return sliced_linear_ref(x, packed, k, bias)


@sliced_linear.register_fake
def _(x, qweight, scale, zero, k, bias, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[2])  # qweight (E, G, N, g/16)


def sliced_linear_ref(x: torch.Tensor, packed, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch (no triton): y_t = x_t Ŵ_{k_t}ᵀ in fp32, cast to x's dtype, one dense Ŵ_k per k present."""
    from mobiquant.kernels.layout import dense_weight

    x2 = x.reshape(-1, x.shape[-1])
    kk = k.reshape(-1).long().clamp(1, packed.num_slices).to(x.device)
    y = torch.zeros(x2.shape[0], packed.out_features, dtype=torch.float32, device=x.device)
    for kv in range(1, packed.num_slices + 1):
        y = torch.where((kk == kv)[:, None], x2.float() @ dense_weight(packed, kv).t(), y)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.out_features)


@torch.library.custom_op("mobiquant::sliced_linear_multi", mutates_args=())
def sliced_linear_multi(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor],
                        zeros: list[torch.Tensor], k: torch.Tensor, bias: torch.Tensor | None,
                        group_size: int) -> torch.Tensor:
    """y (..., N_1 + .. + N_S) = [x Ŵ^(1)ᵀ, .., x Ŵ^(S)ᵀ] (+ bias, concatenated): S <= 3 sliced weights of one
    input (q/k/v, gate/up), weight s at the counts k[..., s] (k (..., S) int32); one launch for one fp16 token."""
    from mobiquant.kernels.layout import PackedSlices

    packs = [PackedSlices(q, s, z, group_size) for q, s, z in zip(qweights, scales, zeros)]
    k = k.to(torch.int32)
    if _use_triton(x):
        from mobiquant.kernels.dispatch import sliced_linear_multi as launch

        return launch(x, packs, k, bias)
    return sliced_linear_multi_ref(x, packs, k, bias)


@sliced_linear_multi.register_fake
def _(x, qweights, scales, zeros, k, bias, group_size):
    return x.new_empty(*x.shape[:-1], sum(q.shape[2] for q in qweights))


def sliced_linear_multi_ref(x: torch.Tensor, packs, k: torch.Tensor, bias: torch.Tensor | None = None):
    """Pure torch twin of ``sliced_linear_multi``: one ``sliced_linear_ref`` per weight, concatenated."""
    bs = [None] * len(packs) if bias is None else bias.split([p.out_features for p in packs])
    return torch.cat([sliced_linear_ref(x, p, k[..., s], bs[s]) for s, p in enumerate(packs)], dim=-1)


# ------------------------------------------------------------------------------------------------ route_counts
@torch.library.custom_op("mobiquant::route_counts", mutates_args=())
def route_counts(x: torch.Tensor, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor, tau: torch.Tensor, force_on: torch.Tensor, force_off: torch.Tensor,
                 given: torch.Tensor, counts_in: torch.Tensor, chunk_k: int = 0) -> torch.Tensor:
    """Slice counts (R,) int32 of one token for R routers sharing the input x (K,).

    s (R, K) the routers' input scales, w1 (R, H, K) fc1 weights, b1 (R, H), w2 (R, E-1, H), b2 (R, E-1) (any float
    dtype; the arithmetic is fp32, as in MoBiRoute.forward),
    tau (R,) fp32 thresholds, force_on / force_off (E-1,) bool (the band allocation: residual slices always on / off),
    given (R,) bool and counts_in (R,) int32: where given, the count is counts_in (uniform and random modes).
    chunk_k: in-features per program of the kernel (0: its default; the engine gives o_proj's router one head), so
    that the fc1 sums, and a score next to τ, come out as the launch it stands for would give them.
    """
    if _use_triton(x):
        from mobiquant.kernels.router import route_counts as launch

        return launch(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in, chunk_k=chunk_k or None)
    return route_counts_ref(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in)


@route_counts.register_fake
def _(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in, chunk_k=0):
    return counts_in.new_empty(w1.shape[0], dtype=torch.int32)


def router_scores(x: torch.Tensor, s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor) -> torch.Tensor:
    """(T, K) -> (T, R, E-1) fp32 scores of R MoBiRoute MLPs on one input: fc2(silu(fc1(x / s_r)))."""
    h = torch.einsum("trk,rhk->trh", x.float()[:, None, :] / s.float(), w1.float()) + b1.float()
    return torch.einsum("trh,reh->tre", torch.nn.functional.silu(h), w2.float()) + b2.float()


def counts_from_scores(scores, tau, force_on, force_off, given, counts_in):
    """(T, R, E-1) scores -> (T, R) int32 nested counts; band forcing and given counts applied (device-only ops)."""
    s = torch.where(force_on, float("inf"), torch.where(force_off, float("-inf"), scores))
    on = (s > tau[:, None].float()).to(torch.int32)
    counts = 1 + torch.cumprod(on, dim=-1).sum(-1).to(torch.int32)
    return torch.where(given, counts_in.to(torch.int32), counts)


def route_counts_ref(x, s, w1, b1, w2, b2, tau, force_on, force_off, given, counts_in):
    """Pure torch twin of ``route_counts`` (one token)."""
    scores = router_scores(x.reshape(1, -1), s, w1, b1, w2, b2)
    return counts_from_scores(scores, tau, force_on, force_off, given, counts_in)[0]


# ------------------------------------------------------------------------------------------ decode-step glue
@torch.library.custom_op("mobiquant::add_rms_norm", mutates_args=())
def add_rms_norm(h: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token h (..., D): (h + r, w * rmsnorm(h + r)) as HF's LlamaRMSNorm (r None: no add, h copied)."""
    if _use_triton(h):
        from mobiquant.kernels.decode_step import add_rms_norm as launch

        return launch(h, r, w, eps)
    return add_rms_norm_ref(h, r, w, eps)


@add_rms_norm.register_fake
def _(h, r, w, eps):
    return torch.empty_like(h), torch.empty_like(h)


def add_rms_norm_ref(h, r, w, eps):
    """Pure torch twin of ``add_rms_norm``: the residual add, then HF's LlamaRMSNorm.forward."""
    hn = h + r if r is not None else h.clone()
    x32 = hn.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return hn, w * x32.to(h.dtype)


@torch.library.custom_op("mobiquant::rope_kv", mutates_args=("k_cache", "v_cache"))
def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One token: q (H*Dh) -> q rotated (H, Dh); k rotated and v written into k_cache, v_cache (KV, S, Dh) at slot
    pos ((1,) int64). cos, sin: (S, Dh) rotary tables (HF's rotate_half convention)."""
    if _use_triton(q):
        from mobiquant.kernels.decode_step import rope_kv as launch

        return launch(q, k, v, cos, sin, pos, k_cache, v_cache)
    return rope_kv_ref(q, k, v, cos, sin, pos, k_cache, v_cache)


@rope_kv.register_fake
def _(q, k, v, cos, sin, pos, k_cache, v_cache):
    DH = k_cache.shape[-1]
    return q.new_empty(q.numel() // DH, DH)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_kv_ref(q, k, v, cos, sin, pos, k_cache, v_cache):
    """Pure torch twin of ``rope_kv`` (HF's apply_rotary_pos_emb; index_copy_ into the caches)."""
    KV, S, DH = k_cache.shape
    c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # (1, Dh)
    q = q.reshape(-1, DH)
    k = k.reshape(KV, DH)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    k_cache.index_copy_(1, pos, k[:, None])
    v_cache.index_copy_(1, pos, v.reshape(KV, 1, DH))
    return q


@torch.library.custom_op("mobiquant::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, window: int,
                     scaling: float) -> torch.Tensor:
    """One token: o (H*Dh,) = softmax(q kᵀ · scaling) v over the cache slots pos - window < j <= pos (window 0: every
    j <= pos); q (H, Dh), caches (KV, S, Dh), query head h reads kv head h // (H / KV)."""
    if _use_triton(q):
        from mobiquant.kernels.decode_step import decode_attention as launch

        return launch(q, k_cache, v_cache, pos, window, scaling)
    return decode_attention_ref(q, k_cache, v_cache, pos, window, scaling)


@decode_attention.register_fake
def _(q, k_cache, v_cache, pos, window, scaling):
    return q.new_empty(q.numel())


def decode_attention_ref(q, k_cache, v_cache, pos, window, scaling):
    """Pure torch twin of ``decode_attention``: matmuls over the whole static cache, masked softmax in fp32."""
    KV, S, DH = k_cache.shape
    H = q.numel() // DH
    j = torch.arange(S, device=q.device)
    valid = j <= pos
    if window:
        valid &= j > pos - window
    qg = q.reshape(KV, H // KV, DH)  # (KV, G, Dh)
    s = torch.matmul(qg, k_cache.transpose(1, 2)).float() * scaling  # (KV, G, S)
    s = s.masked_fill(~valid, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v_cache).reshape(H * DH)


@torch.library.custom_op("mobiquant::silu_mul", mutates_args=())
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u (LLaMA's MLP between gate/up and down)."""
    if _use_triton(g):
        from mobiquant.kernels.decode_step import silu_mul as launch

        return launch(g, u)
    return silu_mul_ref(g, u)


@silu_mul.register_fake
def _(g, u):
    return torch.empty_like(g)


def silu_mul_ref(g, u):
    """Pure torch twin of ``silu_mul``."""
    return torch.nn.functional.silu(g) * u


@torch.library.custom_op("mobiquant::greedy_step", mutates_args=("out", "tok", "pos", "wv", "wi", "cnt"))
def greedy_step(logits: torch.Tensor, out: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, wv: torch.Tensor,
                wi: torch.Tensor, cnt: torch.Tensor) -> None:
    """The decode step's tail: out (V,) fp32 = logits (V,), tok (1,) int64 = the first argmax, pos (1,) += 1.
    wv, wi, cnt: the kernel's workspace (``kernels.decode_step.greedy_workspace``; unused by the torch twin)."""
    if _use_triton(logits):
        from mobiquant.kernels.decode_step import greedy_step as launch

        launch(logits, out, tok, pos, (wv, wi, cnt))
        return
    greedy_step_ref(logits, out, tok, pos)


@greedy_step.register_fake
def _(logits, out, tok, pos, wv, wi, cnt):
    return None


def greedy_workspace(V: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``greedy_step``'s workspace for V logits (the kernel's; empty tensors without triton: the twin needs none)."""
    if triton_available():
        from mobiquant.kernels.decode_step import greedy_workspace as kernel_workspace

        return kernel_workspace(V, device)
    return tuple(torch.zeros(1, dtype=dt, device=device) for dt in (torch.float32, torch.int32, torch.int32))


def greedy_step_ref(logits, out, tok, pos, *workspace):
    """Pure torch twin of ``greedy_step`` (torch's argmax: the first maximum, NaN above every number)."""
    out.copy_(logits)
    tok.copy_(out.argmax().reshape(1))
    pos.add_(1)


__all__ = ["sliced_linear", "sliced_linear_ref", "sliced_linear_multi", "sliced_linear_multi_ref", "route_counts",
           "route_counts_ref", "router_scores", "counts_from_scores", "kernel_compatible", "triton_available",
           "add_rms_norm", "add_rms_norm_ref", "rope_kv", "rope_kv_ref", "decode_attention", "decode_attention_ref",
           "silu_mul", "silu_mul_ref", "greedy_step", "greedy_step_ref",
           "greedy_workspace"]
