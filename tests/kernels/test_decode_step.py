"""The fused decode-step glue (kernels/decode_step.py) against its pure-torch twins (mobiquant.ops *_ref): fresh
random inputs for every case, irregular sizes (feature counts and head sizes that are not powers of two, positions at
both ends of the cache, a sliding window), fp16 and bf16, NaN-poisoned caches and outputs."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE  # noqa: E402
from mobiquant.kernels import decode_step as ds  # noqa: E402

from mobiquant import ops  # noqa: E402

# Triton's interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest; seen with triton 3.9), so
# the bf16 cases, whose point is the rounding, run on a GPU only.
DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the interpreter truncates fp32 -> bf16"))]
_SEED = iter(range(70_000, 80_000))


def rnd(*shape, dtype=torch.float16, scale=1.0):
    g = torch.Generator().manual_seed(next(_SEED))
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def ulps(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 1.5e-3  # ~1-2 ulp of the activation dtype, relative to the max




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 1000, 4096])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rms_norm(dtype, D, residual):
    for _ in range(2):
        h, w = rnd(1, D, dtype=dtype, scale=3.0), rnd(D, dtype=dtype)
        r = rnd(1, D, dtype=dtype) if residual else None
        hn, x = ds.add_rms_norm(h, r, w, 1e-5)
        hr, xr = ops.add_rms_norm_ref(h, r, w, 1e-5)
        assert torch.equal(hn, hr)  # the add is one rounding either way
        torch.testing.assert_close(x.float(), xr.float(), atol=ulps(dtype) * xr.abs().max().item(), rtol=0)


def rope_case(H, KV, DH, S, pos, dtype):
    q, k, v = rnd(1, H * DH, dtype=dtype), rnd(1, KV * DH, dtype=dtype), rnd(1, KV * DH, dtype=dtype)
    ang = torch.rand(S, DH // 2, generator=torch.Generator().manual_seed(next(_SEED))) * 6.3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(DEVICE)  # HF's tables repeat the half
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(DEVICE)
    p = torch.tensor([pos], device=DEVICE)
    caches = [torch.full((KV, S, DH), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    qo = ds.rope_kv(q, k, v, cos, sin, p, caches[0], caches[1])
    qr = ops.rope_kv_ref(q, k, v, cos, sin, p, caches[2], caches[3])
    return qo, qr, caches, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KV,DH,S,pos", [(6, 2, 48, 40, 0), (6, 2, 48, 40, 39), (8, 8, 128, 17, 5),
                                          (4, 1, 20, 9, 3)])
def test_rope_kv(dtype, H, KV, DH, S, pos):
    qo, qr, (kc, vc, kr, vr), pos = rope_case(H, KV, DH, S, pos, dtype)
    assert qo.shape == qr.shape == (H, DH)
    assert torch.equal(qo, qr)  # the same roundings, step by step
    assert torch.equal(kc[:, pos], kr[:, pos]) and torch.equal(vc[:, pos], vr[:, pos])
    others = torch.arange(S, device=DEVICE) != pos
    assert kc[:, others].isnan().all() and vc[:, others].isnan().all()  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KV,DH,S,pos,window", [(6, 2, 48, 40, 0, 0), (6, 2, 48, 40, 39, 0), (8, 2, 128, 200, 130, 0),
                                                  (4, 4, 20, 33, 20, 7), (4, 1, 64, 64, 63, 64),
                                                  (4, 2, 128, 300, 127, 0), (4, 2, 128, 300, 128, 0),
                                                  (4, 2, 128, 300, 290, 0), (4, 1, 48, 300, 200, 90)])
def test_decode_attention(dtype, H, KV, DH, S, pos, window):
    """Slot pos at a block's last and next block's first slot, three blocks, a window starting mid-block: the first
    block (loaded before the wait on Hopper) and the blocks after it."""
    q = rnd(H, DH, dtype=dtype, scale=2.0)
    kc, vc = rnd(KV, S, DH, dtype=dtype), rnd(KV, S, DH, dtype=dtype)
    valid = torch.arange(S) <= pos
    if window:
        valid &= torch.arange(S) > pos - window
    kc[:, ~valid.to(DEVICE)] = float("nan")  # slots outside the window must never be read
    vc[:, ~valid.to(DEVICE)] = float("nan")
    p = torch.tensor([pos], device=DEVICE)
    o = ds.decode_attention(q, kc, vc, p, window, DH ** -0.5)
    ref = ops.decode_attention_ref(q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), p, window, DH ** -0.5)
    assert o.shape == (H * DH,) and torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), ref.float(), atol=ulps(dtype) * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 1000, 14336])
def test_silu_mul(dtype, N):
    g, u = rnd(1, N, dtype=dtype, scale=4.0), rnd(1, N, dtype=dtype)
    y = ds.silu_mul(g, u)
    ref = ops.silu_mul_ref(g, u)
    torch.testing.assert_close(y.float(), ref.float(), atol=ulps(dtype) * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("V", [128256, 1025, 96, 5])
def test_greedy_step(dtype, V):
    """The step's tail against its twin: the fp32 logits, the first argmax (with ties, a NaN, all -inf), pos + 1; twice
    in a row on one workspace (its counter resets itself). Outputs poisoned first."""
    g = torch.Generator().manual_seed(next(_SEED))
    cases = [torch.randn(V, generator=g)]
    tie = torch.randn(V, generator=g)
    j = torch.randint(0, V, (2,), generator=g).sort().values
    tie[j] = tie.max() + 1  # two equal maxima: the first one
    cases.append(tie)
    nan = torch.randn(V, generator=g)
    nan[j[-1]] = float("nan")  # NaN ranks above every number, as torch's argmax
    cases.append(nan)
    cases.append(torch.full((V,), float("-inf")))
    ws = ds.greedy_workspace(V, DEVICE)
    for x in cases:
        logits = x.to(dtype).to(DEVICE)
        out = torch.full((V,), 7.0, device=DEVICE)
        tok = torch.tensor([-1], device=DEVICE)
        pos = torch.randint(0, 100, (1,), generator=g).to(DEVICE)
        ref_out, ref_tok, ref_pos = torch.empty_like(out), tok.clone(), pos.clone()
        ops.greedy_step_ref(logits, ref_out, ref_tok, ref_pos)
        for step in range(2):
            ds.greedy_step(logits, out, tok, pos, ws)
            assert torch.equal(out.isnan(), ref_out.isnan())
            assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
            assert torch.equal(tok, ref_tok) and int(pos) == int(ref_pos) + step
        assert int(ws[2]) == 0


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ds.add_rms_norm(rnd(2, 64), None, rnd(64), 1e-5)  # two tokens
    with pytest.raises(ValueError):
        ds.silu_mul(rnd(1, 8), rnd(1, 9))
    one = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="greedy_step"):  # out in fp16, a workspace too small
        ds.greedy_step(rnd(100), rnd(100), one, one, ds.greedy_workspace(100, DEVICE))
    with pytest.raises(ValueError, match="greedy_step"):
        ds.greedy_step(rnd(2000), rnd(2000).float(), one, one, ds.greedy_workspace(100, DEVICE))
    kc = rnd(2, 8, 16)
    with pytest.raises(ValueError):
        ds.decode_attention(rnd(3, 16), kc, kc, torch.tensor([0], device=DEVICE), 0, 0.25)  # 3 heads over 2 kv


# ---------------------------------------------------------------------------------------------------- GPU only
def _router(R, K, E, g):
    """A random fp32 router stack as the engine keeps it (route_counts' arguments after x), thresholds near 0."""
    H = 16
    t = [torch.rand(R, K, generator=g) + 0.5, torch.randn(R, H, K, generator=g) * K ** -0.5,
         torch.randn(R, H, generator=g) * 0.1, torch.randn(R, E - 1, H, generator=g) * H ** -0.5,
         torch.zeros(R, E - 1), torch.randn(R, generator=g) * 0.05]
    off = torch.zeros(E - 1, dtype=torch.bool)
    rest = [off, off, torch.zeros(R, dtype=torch.bool), torch.ones(R, dtype=torch.int32)]
    return [a.to(DEVICE) for a in t + rest]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pdl_block_chain_in_graph_equals_eager_without_pdl():
    """One decode block's launches (norm, router, v7, rotary + cache, attention, router, v7, norm, router, v7 gate/up,
    SiLU·up, router, v7 down), the glue and routers launched with PDL and captured in a CUDA graph, equal the same
    chain launched eagerly without PDL, bit for bit, on fresh inputs at each of 3 replays (outputs and the written
    cache slot poisoned before each replay): a read before griddepcontrol.wait would show here as a moving error."""
    from kernel_helpers import graph_replays_equal_eager, make_weight
    from mobiquant.kernels import pack_slices, sliced_gemv_cc
    from mobiquant.kernels import router as rk

    D, F, H, KV, DH, S, pos = 1024, 2816, 8, 2, 128, 64, 50
    g = torch.Generator().manual_seed(4242)

    def weight(N, K, seed):
        planes, s1, z1, _ = make_weight(N, K, 128, seed, DEVICE, 0.02)
        return pack_slices(planes, s1, z1)

    p_qkv, p_o, p_gu, p_d = weight((H + 2 * KV) * DH, D, 1), weight(D, H * DH, 2), weight(2 * F, D, 3), weight(D, F, 4)
    rq, ro, rg, rd = _router(3, D, 4, g), _router(1, H * DH, 4, g), _router(2, D, 4, g), _router(1, F, 4, g)
    wn = rnd(D)
    ang = torch.rand(S, DH // 2, generator=g) * 6.3
    cos = torch.cat([ang.cos(), ang.cos()], -1).half().to(DEVICE)
    sin = torch.cat([ang.sin(), ang.sin()], -1).half().to(DEVICE)
    p = torch.tensor([pos], device=DEVICE)

    def block(h0, r0, kc, vc, pdl):
        ds.PDL = rk.PDL_WAIT = rk.PDL_TRIGGER = pdl
        cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=4, num_warps=4, num_stages=1, PF=1, PDL=int(pdl))
        h1, x1 = ds.add_rms_norm(h0, r0, wn, 1e-5)
        c1 = rk.route_counts(x1.reshape(-1), *rq)
        qkv = sliced_gemv_cc(x1, p_qkv, c1[:1], config=cfg)[0]
        q, k, v = qkv[:H * DH], qkv[H * DH:(H + KV) * DH], qkv[(H + KV) * DH:]
        o = ds.decode_attention(ds.rope_kv(q, k, v, cos, sin, p, kc, vc), kc, vc, p, 0, DH ** -0.5)
        c2 = rk.route_counts(o, *ro)
        h2, x2 = ds.add_rms_norm(h1, sliced_gemv_cc(o[None], p_o, c2, config=cfg), wn, 1e-5)
        c3 = rk.route_counts(x2.reshape(-1), *rg)
        gu = sliced_gemv_cc(x2, p_gu, c3[:1], config=cfg)[0]
        a = ds.silu_mul(gu[:F], gu[F:])
        c4 = rk.route_counts(a, *rd)
        d = sliced_gemv_cc(a[None], p_d, c4, config=cfg)
        return [h1, x1, qkv, o, h2, x2, gu, a, d, c1, c2, c3, c4]

    try:
        seen = graph_replays_equal_eager(block, rnd, (D, KV, S, DH), poison_slot=pos)
        assert len(seen) > 1  # the routers' counts vary
    finally:
        ds.PDL = rk.PDL_WAIT = rk.PDL_TRIGGER = True
