"""The router finished inside v7 (router.route_partials + sliced_gemv_cc(route=...)) against the router kernel
(router.route_counts) followed by v7 with the counts given: the counts must be equal, bit for bit, and so the outputs.

CPU: Triton's interpreter, irregular shapes (K not a multiple of the router's chunk, hidden sizes 7 and 16, E = 3
and 4, 1..5 partials per router), one to three weights per launch, a launch of one weight of a larger router group
(r_off), given counts and band forcing mixed in, fresh random inputs, poisoned counts and outputs.
GPU (`pytest -m gpu`): the same, plus thresholds swept ulp by ulp across the scores at the LLaMA-3-8B router shapes
(16 and 56 partials, v7 on 4 and on 2 warps), and one decode block's chain captured in a CUDA graph with PDL.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, graph_replays_equal_eager, make_weight  # noqa: E402
from mobiquant.kernels import pack_slices, quantize_x_int8, sliced_gemv_cc  # noqa: E402
from mobiquant.kernels import router as rk  # noqa: E402
from mobiquant.kernels.decode_step import add_rms_norm, silu_mul  # noqa: E402

from mobiquant.ops import router_scores  # noqa: E402

_SEED = iter(range(90_000, 99_000))


def weights(Ns, K, group):
    out = []
    for N in Ns:
        planes, s1, z1, _ = make_weight(N, K, group, next(_SEED), DEVICE, 0.05)
        out.append(pack_slices(planes, s1, z1))
    return out


def router_stack(R, H, K, E, g, dtype=torch.float32):
    """R routers as the engine stacks them (s, w1, b1, w2, b2), fp32 (engine) or fp16 storage."""
    s = torch.rand(R, K, generator=g) + 0.5
    w1 = torch.randn(R, H, K, generator=g) * K ** -0.5
    b1 = torch.randn(R, H, generator=g) * 0.1
    w2 = torch.randn(R, E - 1, H, generator=g) * H ** -0.5
    b2 = torch.randn(R, E - 1, generator=g) * 0.05
    return [s.to(DEVICE)] + [t.to(dtype).to(DEVICE) for t in (w1, b1, w2, b2)]


def flags(R, E, g, band=False, given_p=0.0):
    """tau placeholder, force_on / force_off, given, counts_in."""
    if band:
        b = int(torch.randint(1, E + 1, (1,), generator=g))
        on = torch.tensor([c < b - 1 for c in range(E - 1)])
        off = torch.tensor([c > b - 1 for c in range(E - 1)])
    else:
        on = off = torch.zeros(E - 1, dtype=torch.bool)
    given = torch.rand(R, generator=g) < given_p
    cin = torch.randint(1, E + 1, (R,), generator=g, dtype=torch.int32)
    return [t.to(DEVICE) for t in (on, off, given, cin)]


def fused_vs_chain(x, packs, rt, tau, fl, chunk_k=None, r_off=0, config=None):
    """(counts, y) of both paths; asserts they are equal and that the fused path wrote every count it owns."""
    s, w1, b1, w2, b2 = rt
    on, off, given, cin = fl
    R = w1.shape[0]
    args = (x, s, w1, b1, w2, b2, tau, on, off, given, cin)
    ref_counts = rk.route_counts(*args, chunk_k=chunk_k)
    S = len(packs)
    k = ref_counts[r_off:r_off + S].reshape(1, S).contiguous()
    y_ref = sliced_gemv_cc(x[None], packs if S > 1 else packs[0], k if S > 1 else k[0], config=config)
    out = torch.full((R,), -7, dtype=torch.int32, device=DEVICE)  # poisoned: the fused launch must write its counts
    plan = rk.route_partials(*args, out=out, chunk_k=chunk_k)
    plan.r_off = r_off
    y = torch.full_like(y_ref, float("nan"))
    sliced_gemv_cc(x[None], packs if S > 1 else packs[0], None, out=y, config=config, route=plan)
    mine = torch.zeros(R, dtype=torch.bool)
    mine[r_off:r_off + S] = True
    assert torch.equal(out.cpu()[mine], ref_counts.cpu()[mine])
    assert (out.cpu()[~mine] == -7).all()  # routers of other launches: untouched
    assert torch.equal(y, y_ref)  # same counts -> same v7 work, bit for bit
    return ref_counts, y


@pytest.mark.parametrize("Ns,K,group,H,E,chunk_k", [
    ([200, 72, 72], 320, 64, 16, 4, 64),  # q/k/v-like, 5 partials per router
    ([130], 640, 128, 7, 4, None),  # one weight, 3 partials of 256 (the last one short), hidden 7
    ([96, 96], 256, 128, 16, 3, 1 << 20),  # gate/up-like, one partial per router, E = 3
    ([72, 40], 384, 32, 16, 4, 100),  # 4 partials, group 32
    ([64], 2048, 128, 16, 4, None),  # the default chunk at K = 2048: 2 partials of one 1024-wide tile each
])
def test_fused_counts_equal_router_kernel(Ns, K, group, H, E, chunk_k):
    g = torch.Generator().manual_seed(next(_SEED))
    packs = weights(Ns, K, group)
    R = len(Ns)
    seen = set()
    for trial in range(6):
        rt = router_stack(R, H, K, E, g, torch.float16 if trial % 2 else torch.float32)
        x = torch.randn(K, generator=g).half().to(DEVICE)
        sc = router_scores(x[None], *rt)[0]  # (R, E-1)
        if trial < 4:  # τ next to one of the scores: the counts there depend on the last bits of the sum
            tau = (sc[:, trial % (E - 1)] + torch.tensor([1e-2, -1e-2, 3e-3])[:R].to(DEVICE)).float()
        else:  # τ above every score (count 1) and below every score (count E), whatever the draw
            tau = sc.max(-1).values.float() + 1 if trial == 4 else sc.min(-1).values.float() - 1
        fl = flags(R, E, g, band=trial == 3, given_p=0.3 if trial in (2, 3) else 0.0)
        counts, _ = fused_vs_chain(x, packs, rt, tau, fl, chunk_k)
        seen |= set(counts.tolist())
    assert {1, E} <= seen


def test_one_weight_of_a_router_group():
    """A launch of the second weight of a 3-router group (r_off = 1): only its router's count is written."""
    g = torch.Generator().manual_seed(next(_SEED))
    packs = weights([100], 256, 64)
    for r_off in (0, 1, 2):
        rt = router_stack(3, 16, 256, 4, g)
        x = torch.randn(256, generator=g).half().to(DEVICE)
        tau = router_scores(x[None], *rt)[0][:, 0].float() + 1e-2
        fused_vs_chain(x, packs, rt, tau, flags(3, 4, g), chunk_k=64, r_off=r_off)


def test_route_rejects_bad_arguments():
    g = torch.Generator().manual_seed(1)
    packs = weights([64, 64], 128, 64)
    rt = router_stack(1, 16, 128, 4, g)
    x = torch.randn(128, generator=g).half().to(DEVICE)
    tau = torch.zeros(1, device=DEVICE)
    plan = rk.route_partials(x, *rt, tau, *flags(1, 4, g))
    with pytest.raises(ValueError, match="routers"):
        sliced_gemv_cc(x[None], packs, None, route=plan)  # 2 weights, 1 router
    with pytest.raises(ValueError, match="one token"):
        sliced_gemv_cc(torch.stack([x, x]), packs[0], None, route=plan)


@pytest.mark.parametrize("K,chunk_k,given_p", [(512, None, 0.0), (384, 128, 0.5), (256, 1 << 20, 1.0)])
def test_router_writes_int8_activations(K, chunk_k, given_p):
    """route_partials(x_int8=...): router 0's programs write quantize_x_int8(x)'s codes and (sx, SX), bit for bit,
    given counts or not; the counts are unchanged, and the int8 linear on them equals the one on the quantizer's."""
    g = torch.Generator().manual_seed(next(_SEED))
    packs = weights([96, 64], K, 128)
    rt = router_stack(2, 16, K, 4, g)
    x = (torch.randn(K, generator=g) * 3).half().to(DEVICE)
    tau = router_scores(x[None], *rt)[0][:, 0].float() + 1e-2
    fl = flags(2, 4, g, given_p=given_p)
    want_q, want_s = quantize_x_int8(x[None])
    xq = torch.full_like(want_q, -1)  # poisoned
    xs = torch.full_like(want_s, float("nan"))
    plan = rk.route_partials(x, *rt, tau, *fl, chunk_k=chunk_k, x_int8=(xq, xs))
    counts = rk.route_counts(x, *rt, tau, *fl, chunk_k=chunk_k)
    assert torch.equal(xq, want_q) and torch.equal(xs, want_s)
    cfg = dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1)
    y = sliced_gemv_cc(x[None], packs, None, config=cfg, route=plan, x_int8=(xq, xs))
    y_ref = sliced_gemv_cc(x[None], packs, counts[None], config=cfg, x_int8=(want_q, want_s))
    assert torch.equal(plan.out, counts) and torch.equal(y, y_ref)


def test_router_int8_activations_reject_bad_arguments():
    g = torch.Generator().manual_seed(2)
    rt = router_stack(1, 16, 320, 4, g)
    x = torch.randn(320, generator=g).half().to(DEVICE)
    bufs = (torch.empty(1, 80, dtype=torch.int32, device=DEVICE), torch.empty(1, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="multiple of a chunk"):  # 320 = 256 + 64: no whole groups in the tail
        rk.route_partials(x, *rt, torch.zeros(1, device=DEVICE), *flags(1, 4, g), x_int8=bufs)
    rt = router_stack(1, 16, 256, 4, g)
    with pytest.raises(ValueError, match="x_int8 must be"):
        rk.route_partials(x[:256], *rt, torch.zeros(1, device=DEVICE), *flags(1, 4, g), x_int8=bufs)


def prologue_case(kind, K, residual, g, dtype=torch.float16):
    """(route_partials keywords, the glue kernel's (x, h + r or None)) for a norm or SiLU·up prologue."""
    a = (torch.randn(K, generator=g) * 3).to(dtype).to(DEVICE)[None]  # (1, K): one token, as the engine has it
    b = (torch.randn(K, generator=g) * 2).to(dtype).to(DEVICE)[None]
    if kind == "norm":
        w = (torch.rand(K, generator=g) + 0.5).to(dtype).to(DEVICE)
        r = b if residual else None
        h, x = add_rms_norm(a, r, w, 1e-5)
        return dict(norm=(a, r, w, 1e-5)), x, h
    return dict(silu=(a, b)), silu_mul(a, b), None


@pytest.mark.parametrize("kind,K,residual,int8,given_p", [
    ("norm", 512, True, True, 0.0),  # the post-attention norm, int8 codes from the computed x
    ("norm", 320, False, False, 0.5),  # the first block's norm (no add), a short last chunk, some counts given
    ("silu", 768, None, True, 0.5),
    ("silu", 320, None, False, 0.0),
    *(pytest.param(*case, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")])
      for case in (("norm", 4096, True, True, 0.3), ("silu", 14336, None, True, 0.3))),  # LLaMA-3-8B widths
])
def test_router_prologue_equals_the_glue_kernel(kind, K, residual, int8, given_p):
    """route_partials(norm= / silu=): the launch computes x itself, bit for bit what add_rms_norm / silu_mul give
    (the same Triton code and warps), h + r too; the counts and the linear after it equal those on the glue
    kernel's x, and so do the int8 codes."""
    g = torch.Generator().manual_seed(next(_SEED))
    packs = weights([96, 64], K, 128 if int8 else 64)
    rt = router_stack(2, 16, K, 4, g)
    kw, x_ref, h_ref = prologue_case(kind, K, residual, g)
    tau = router_scores(x_ref.float(), *rt)[0][:, 0].float() + torch.tensor([1e-2, -1e-2], device=DEVICE)
    fl = flags(2, 4, g, given_p=given_p)
    bufs = None
    if int8:
        want_q, want_s = quantize_x_int8(x_ref)
        bufs = (torch.full_like(want_q, -1), torch.full_like(want_s, float("nan")))  # poisoned
    plan = rk.route_partials(None, *rt, tau, *fl, x_int8=bufs, **kw)
    assert torch.equal(plan.x.reshape(-1), x_ref.reshape(-1))
    assert (plan.h is None) == (h_ref is None) and (h_ref is None or torch.equal(plan.h, h_ref))
    counts = rk.route_counts(x_ref.reshape(-1), *rt, tau, *fl)
    cfg = dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1)
    y = sliced_gemv_cc(plan.x.reshape(1, -1), packs, None, config=cfg, route=plan, x_int8=bufs)
    y_ref = sliced_gemv_cc(x_ref.reshape(1, -1), packs, counts[None], config=cfg,
                           x_int8=None if bufs is None else (want_q, want_s))
    assert torch.equal(plan.out, counts) and torch.equal(y, y_ref)
    if int8:
        assert torch.equal(bufs[0], want_q) and torch.equal(bufs[1], want_s)


def test_router_prologue_rejects_bad_arguments():
    g = torch.Generator().manual_seed(4)
    rt = router_stack(1, 16, 512, 4, g)
    fl = flags(1, 4, g)
    tau = torch.zeros(1, device=DEVICE)
    kw, x, _ = prologue_case("silu", 512, None, g)
    with pytest.raises(ValueError, match="one of x"):
        rk.route_partials(x.reshape(-1), *rt, tau, *fl, **kw)
    with pytest.raises(ValueError, match="x, norm= or silu="):
        rk.route_partials(None, *rt, tau, *fl)
    kw_wide, _, _ = prologue_case("silu", 2 * rk.MAX_TILE_K, None, g)  # a chunk past one tile
    with pytest.raises(ValueError, match=f"at most {rk.MAX_TILE_K}"):
        rk.route_partials(None, *router_stack(1, 16, 2 * rk.MAX_TILE_K, 4, g), tau, *fl, chunk_k=1 << 20, **kw_wide)
    a, b = kw["silu"]
    with pytest.raises(ValueError, match="512 contiguous"):
        rk.route_partials(None, *rt, tau, *fl, silu=(a, b[:, :128]))
    with pytest.raises(ValueError, match="512 contiguous"):
        rk.route_partials(None, *rt, tau, *fl, norm=(a.float(), None, a.float()[0], 1e-5))


def attention_case(H, KV, DH, S, pos, g):
    """q (H, DH) and fp16 caches (KV, S, DH) with slots past pos poisoned (never read), pos a device tensor."""
    q = torch.randn(H, DH, generator=g).half().to(DEVICE)
    kc = torch.randn(KV, S, DH, generator=g).half()
    vc = torch.randn(KV, S, DH, generator=g).half()
    kc[:, pos + 1:] = vc[:, pos + 1:] = float("nan")
    return q, kc.to(DEVICE), vc.to(DEVICE), torch.tensor([pos], device=DEVICE)


@pytest.mark.parametrize("H,KV,DH,S,pos,hidden,int8,given_p", [
    (4, 2, 128, 160, 130, 16, True, 0.0),  # two blocks of cache slots, int8 codes (one group per head)
    (6, 3, 64, 40, 17, 7, False, 0.0),  # SmolLM2-like heads of 64 (no int8), an odd hidden size
    (2, 1, 128, 24, 0, 16, True, 1.0),  # the first position; the count given: no partial stored
    *(pytest.param(*case, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")])
      for case in ((32, 8, 128, 1024, 700, 16, True, 0.0), (32, 8, 128, 64, 5, 16, False, 0.3))),  # LLaMA-3-8B
])
def test_router_in_attention_equals_router_launch(H, KV, DH, S, pos, hidden, int8, given_p):
    """route_attention: decode_attention whose programs also store o_proj's router partials (and int8 codes) over
    their head's features. o is decode_attention's, bit for bit; the plan's partials are route_partials' with chunks
    of one head (chunk_k = DH) (bit for bit in the interpreter, to ~1 ulp on the GPU), its counts route_counts' (τ
    away from the scores) and so the linear after it; the int8 codes are the quantizer's."""
    g = torch.Generator().manual_seed(next(_SEED))
    q, kc, vc, p = attention_case(H, KV, DH, S, pos, g)
    K = H * DH
    o_ref = rk.decode_attention(q, kc, vc, p, 0, DH ** -0.5)
    rt = router_stack(1, hidden, K, 4, g)
    tau = router_scores(o_ref.float()[None], *rt)[0][:, 0].float() + 1e-2
    fl = flags(1, 4, g, given_p=given_p)
    packs = weights([96], K, 128 if int8 else 64)
    bufs = want = None
    if int8:
        want = quantize_x_int8(o_ref[None])
        bufs = (torch.full_like(want[0], -1), torch.full_like(want[1], float("nan")))  # poisoned
    rk._scratch(q.device, 1, 1, store=rk._SCRATCH)[0].fill_(float("nan"))  # poisoned workspace
    plan = rk.route_attention(q, kc, vc, p, 0, DH ** -0.5, *rt, tau, *fl, x_int8=bufs)
    n = plan.meta["SPLIT"] * plan.meta["HP"]
    got_ws = plan.ws[:n].clone()
    ref = rk.route_partials(o_ref, *rt, tau, *fl, chunk_k=DH)
    assert plan.meta == ref.meta and plan.meta["SPLIT"] == H
    assert torch.equal(plan.x, o_ref)
    if given_p == 1:  # a given count: no partial stored
        assert got_ws.isnan().all()
    elif DEVICE == "cpu":  # the interpreter: the same code, the same sums
        assert torch.equal(got_ws, ref.ws[:n])
    else:  # the same code compiled into two kernels: on the H100 most partials differ in the last bit
        torch.testing.assert_close(got_ws, ref.ws[:n], rtol=1e-5, atol=1e-7)
    cfg = dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1)
    plan.ws = got_ws
    y = sliced_gemv_cc(plan.x[None], packs[0], None, config=cfg, route=plan, x_int8=bufs)
    counts = rk.route_counts(o_ref, *rt, tau, *fl, chunk_k=DH)
    y_ref = sliced_gemv_cc(o_ref[None], packs[0], counts, config=cfg, x_int8=want)
    assert torch.equal(plan.out, counts) and torch.equal(y, y_ref)
    if int8:
        assert torch.equal(bufs[0], want[0]) and torch.equal(bufs[1], want[1])


def test_router_in_attention_rejects_bad_arguments():
    g = torch.Generator().manual_seed(5)
    q, kc, vc, p = attention_case(2, 1, 64, 8, 3, g)
    fl = flags(1, 4, g)
    tau = torch.zeros(1, device=DEVICE)
    with pytest.raises(ValueError, match="one router"):
        rk.route_attention(q, kc, vc, p, 0, 0.125, *router_stack(2, 16, 128, 4, g), tau.repeat(2), *flags(2, 4, g))
    with pytest.raises(ValueError, match="one router"):
        rk.route_attention(q, kc, vc, p, 0, 0.125, *router_stack(1, 16, 256, 4, g), tau, *fl)
    with pytest.raises(ValueError, match="heads of 128"):
        bufs = (torch.zeros(1, 32, dtype=torch.int32, device=DEVICE), torch.zeros(1, 1, 2, device=DEVICE))
        rk.route_attention(q, kc, vc, p, 0, 0.125, *router_stack(1, 16, 128, 4, g), tau, *fl, x_int8=bufs)


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Ns,K,config", [
    ([256, 128, 128], 4096, dict(BLOCK_N=128, GPI=1, SPLIT_K=8, num_warps=4, num_stages=1, PF=1, PDL=1)),
    ([256], 14336, dict(BLOCK_N=64, GPI=1, SPLIT_K=16, num_warps=2, num_stages=1, PF=1, PDL=1)),  # down: 2 warps
])
def test_gpu_thresholds_swept_ulp_by_ulp(Ns, K, config):
    """τ stepped one fp32 ulp at a time across each router's first score, as the router kernel computes it (found
    by bisection on its count): a score one ulp apart between the router's finishing program and v7's programs
    would give different counts at one of the steps."""
    g = torch.Generator().manual_seed(next(_SEED))
    packs = weights(Ns, K, 128)
    R, E = len(Ns), 4
    for _ in range(2):
        rt = router_stack(R, 16, K, E, g, torch.float16)
        x = torch.randn(K, generator=g).half().to(DEVICE)
        fl = flags(R, E, g)
        base = router_scores(x[None], *rt)[0][:, 0].float()  # torch's order: near the kernel's score
        lo, hi = base - 1e-3 * base.abs() - 1e-6, base + 1e-3 * base.abs() + 1e-6
        for _ in range(60):  # count >= 2 at τ = lo (score above), 1 at hi: bisect to the kernel's score
            mid = (lo + hi) / 2
            on = rk.route_counts(x, *rt, mid, *fl) >= 2
            lo, hi = torch.where(on, mid, lo), torch.where(on, hi, mid)
        assert (rk.route_counts(x, *rt, lo, *fl) >= 2).all() and (rk.route_counts(x, *rt, hi, *fl) == 1).all()
        seen = set()
        for j in range(-6, 7):
            tau = hi.clone()
            for _ in range(abs(j)):
                tau = torch.nextafter(tau, torch.full_like(tau, float("inf") if j > 0 else float("-inf")))
            counts, _ = fused_vs_chain(x, packs, rt, tau, fl, config=config)
            seen.add(tuple((counts >= 2).tolist()))
        assert len(seen) > 1  # the sweep crossed the scores


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_block_chain_fused_router_in_graph_equals_router_kernel_chain():
    """One decode block's launches with the fused router (router partials, then v7 finishing the counts; glue,
    routers and v7 with PDL) captured in a CUDA graph, against the same block with route_counts and v7 reading the
    counts, launched eagerly: every output and count equal, bit for bit, at 3 replays on fresh inputs (outputs and
    counts poisoned before each replay), at thresholds that make the counts vary."""
    from mobiquant.kernels import decode_step as ds

    D, F, H, KV, DH, S, pos = 1024, 2816, 8, 2, 128, 64, 50
    g = torch.Generator().manual_seed(4343)
    p_qkv = weights([H * DH, KV * DH, KV * DH], D, 128)
    p_o, p_gu, p_d = weights([D], H * DH, 128), weights([F, F], D, 128), weights([D], F, 128)
    rq, ro, rg, rd = (router_stack(R, 16, K, 4, g) for R, K in ((3, D), (1, H * DH), (2, D), (1, F)))
    fq, fo, fg, fd = (flags(R, 4, g) for R in (3, 1, 2, 1))
    taus = [torch.randn(R, generator=g).to(DEVICE) * 0.05 for R in (3, 1, 2, 1)]
    wn = (torch.randn(D, generator=g) * 0.5 + 1).half().to(DEVICE)
    ang = torch.rand(S, DH // 2, generator=g) * 6.3
    cos = torch.cat([ang.cos(), ang.cos()], -1).half().to(DEVICE)
    sin = torch.cat([ang.sin(), ang.sin()], -1).half().to(DEVICE)
    p = torch.tensor([pos], device=DEVICE)

    def lin(x, packs, rt, tau, fl, fused):
        x = x.reshape(-1)
        args = (x, *rt, tau, *fl)
        if fused:
            plan = rk.route_partials(*args)
            return plan.out, sliced_gemv_cc(x[None], packs if len(packs) > 1 else packs[0], None, route=plan)[0]
        c = rk.route_counts(*args)
        k = c.reshape(1, -1) if len(packs) > 1 else c
        return c, sliced_gemv_cc(x[None], packs if len(packs) > 1 else packs[0], k)[0]

    def block(h0, r0, kc, vc, fused):
        h1, x1 = ds.add_rms_norm(h0, r0, wn, 1e-5)
        c1, qkv = lin(x1, p_qkv, rq, taus[0], fq, fused)
        q, k, v = qkv[:H * DH], qkv[H * DH:(H + KV) * DH], qkv[(H + KV) * DH:]
        o = ds.decode_attention(ds.rope_kv(q, k, v, cos, sin, p, kc, vc), kc, vc, p, 0, DH ** -0.5)
        c2, yo = lin(o, p_o, ro, taus[1], fo, fused)
        h2, x2 = ds.add_rms_norm(h1, yo[None], wn, 1e-5)
        c3, gu = lin(x2, p_gu, rg, taus[2], fg, fused)
        a = ds.silu_mul(gu[:F], gu[F:])
        c4, d = lin(a, p_d, rd, taus[3], fd, fused)
        return [h1, x1, qkv, o, h2, x2, gu, a, d, c1, c2, c3, c4]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).half().to(DEVICE)

    seen = graph_replays_equal_eager(block, rnd, (D, KV, S, DH))
    assert len(seen) > 1  # the counts vary


# ------------------------------------------------------------------------------------------ the norm folded
def fold_case(N, Kin, R, H, E, g, given_p):
    """A producer weight (N outputs, Kin inputs, group 128), its x and counts, and a fold for R routers over N."""
    (pack,) = weights([N], Kin, 128)
    x = torch.randn(1, Kin, generator=g).half().to(DEVICE)
    k = torch.randint(1, E + 1, (1,), generator=g, dtype=torch.int32).to(DEVICE)
    h0 = (torch.randn(N, generator=g) * 2).half().to(DEVICE)
    w = (torch.rand(N, generator=g) + 0.5).half().to(DEVICE)
    rt = router_stack(R, H, N, E, g)
    fl = flags(R, E, g, given_p=given_p)
    bufs = (torch.full((1, N // 4), -1, dtype=torch.int32, device=DEVICE),
            torch.full((1, N // 128, 2), float("nan"), device=DEVICE))  # poisoned
    return pack, x, k, h0, w, rt, fl, bufs


@pytest.mark.parametrize("N,Kin,R,H,E,split_k,given_p,routed", [
    (384, 256, 3, 16, 4, 2, 0.0, True),  # q/k/v-like: three routers, the tiles' last splits fold
    (256, 512, 2, 7, 3, 1, 0.5, True),  # gate/up-like, one split (the fold in the only program), some counts given
    (512, 384, 2, 16, 4, 3, 1.0, True),  # every count given: no partial stored
    (384, 256, 3, 16, 4, 2, 1.0, False),  # no router partials compiled in (the engine's all-given graph)
    *(pytest.param(*case, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")])
      for case in ((4096, 4096, 2, 16, 4, 16, 0.0, True), (4096, 14336, 3, 16, 4, 16, 0.3, True),  # LLaMA-3-8B o,
                   (4096, 14336, 3, 16, 4, 16, 1.0, False))),  # down
])
def test_norm_fold_equals_the_norm_and_router_launch(N, Kin, R, H, E, split_k, given_p, routed):
    """sliced_gemv_cc(fold=): y is not stored; h += y (rounded as torch's add, y the unfolded launch's bits), the
    codes are act_int8's of w * h, the sums of squares and fc1 partials those of torch (to fp32 rounding), partials
    of given routers untouched. The group's launch on the fold's plan applies rstd: its counts are route_counts' on
    add_rms_norm's x (τ away from the scores), its y that of its counts on the codes scaled by rstd."""
    g = torch.Generator().manual_seed(next(_SEED))
    pack, x, k, h0, w, rt, fl, bufs = fold_case(N, Kin, R, H, E, g, given_p)
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=split_k, num_warps=4, PF=1)
    y_ref = sliced_gemv_cc(x, pack, k, config=cfg)  # (1, N) fp16
    _, x_norm = add_rms_norm(h0[None], y_ref, w, 1e-5)  # the unfolded chain's input to the next group
    tau = router_scores(x_norm.float(), *rt)[0][:, 0].float() + 1e-2
    out = torch.full((R,), -7, dtype=torch.int32, device=DEVICE)
    h = h0.clone()
    fold = rk.norm_fold(h, w, 1e-5, *rt, tau, *fl, out, bufs, routed=routed)
    fold.ws.fill_(float("nan"))
    assert sliced_gemv_cc(x, pack, k, config=cfg, fold=fold) is None
    hn = (h0.float() + y_ref[0].float()).half()
    assert torch.equal(h, hn)
    v = w.float() * hn.float()
    want_q, want_s = quantize_x_int8(v[None])
    assert torch.equal(bufs[0], want_q) and torch.equal(bufs[1], want_s)
    T = N // 128
    torch.testing.assert_close(fold.ss, hn.float().pow(2).reshape(T, 128).sum(-1), rtol=1e-6, atol=0)
    s, w1 = rt[0], rt[1]
    given = fl[2]
    for r in range(R):
        got = fold.ws.reshape(R, T, -1)[r, :, :H]
        if given[r] or not routed:
            assert got.isnan().all()
        else:
            want = (w1[r].float() * (v / s[r])).reshape(H, T, 128).sum(-1).t()  # (T, H)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the group's launch: one weight per router, the fold's codes; rstd applied inside
    packs = weights([64] * R, N, 128)
    counts = rk.route_counts(x_norm.reshape(-1), *rt, tau, *fl)
    gcfg = dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1)
    y = sliced_gemv_cc(h[None], packs if R > 1 else packs[0], None, config=gcfg, route=fold.plan, x_int8=bufs)
    assert torch.equal(out, counts)
    rstd = torch.rsqrt(fold.ss.double().sum() / N + 1e-5).float()
    scaled = bufs[1].clone()
    scaled[..., 0] *= rstd
    y_ref2 = sliced_gemv_cc(h[None], packs if R > 1 else packs[0], counts[None] if R > 1 else counts, config=gcfg,
                            x_int8=(bufs[0], scaled))
    torch.testing.assert_close(y.float(), y_ref2.float(), rtol=2e-3, atol=2e-3 * y_ref2.float().abs().max().item())


def test_norm_fold_rejects_bad_arguments():
    g = torch.Generator().manual_seed(5)
    pack, x, k, h0, w, rt, fl, bufs = fold_case(256, 256, 2, 16, 4, g, 0.0)
    tau = torch.zeros(2, device=DEVICE)
    out = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    fold = rk.norm_fold(h0, w, 1e-5, *rt, tau, *fl, out, bufs)
    with pytest.raises(ValueError, match="fold takes one weight"):
        sliced_gemv_cc(x, pack, k, config=dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1), fold=fold)
    with pytest.raises(ValueError, match="fold takes one weight"):
        sliced_gemv_cc(x, weights([128], 256, 128)[0], k, fold=fold)  # 128 outputs, h of 256
    with pytest.raises(ValueError, match="needs x_int8"):
        sliced_gemv_cc(h0[None], weights([64, 64], 256, 128), None, route=fold.plan)
    with pytest.raises(ValueError, match="h and w must be"):
        rk.norm_fold(h0.float(), w, 1e-5, *rt, tau, *fl, out, bufs)
    with pytest.raises(ValueError, match="x_int8 must be"):
        rk.norm_fold(h0, w, 1e-5, *rt, tau, *fl, out, (bufs[0][:, :32], bufs[1]))
