"""sliced_gemv_cc (decode v7, CUDA cores, fp16) against the dense reference built from the library's quantized parts.

CPU: Triton's interpreter (the PTX-free path: the same q values, fp32 products), small irregular shapes (N = 781),
every k, mixed k per token, split-K and prefetch variants, fresh random inputs, NaN-poisoned outputs; the PTX text of
the per-word dot is executed instruction by instruction with fp16 rounding (numpy), including x at the fp16 limit.
GPU (`pytest -m gpu tests/kernels`): LLaMA shapes, large-magnitude x, PDL launches chained in a CUDA graph.
"""

import struct

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import (  # noqa: E402
    DEVICE,
    M32,
    make_weight,
    mma_word_lanes,
    pdl_chain_in_graph_equals_eager,
    reference,
    run_ptx,
    run_ptx_warp,
    tol,
)
from mobiquant.kernels import pack_slices, sliced_gemv, sliced_gemv_cc, sliced_gemv_mma, sliced_linear  # noqa: E402
from mobiquant.kernels.sliced_gemv import split_count  # noqa: E402
from mobiquant.kernels.sliced_gemv_cc import _h2, asm_cc_text, asm_mma_text, asm_xsum_text, default_config_cc  # noqa: E402

_SEED = iter(range(40_000, 50_000))


def run_case(N, K, g, kv, config=None, x_scale=1.0, w_scale=1.0):
    seed = next(_SEED)
    planes, s1, z1, codes = make_weight(N, K, g, seed, DEVICE, w_scale)
    p = pack_slices(planes, s1, z1)
    gen = torch.Generator().manual_seed(seed + 7919)
    x = (torch.randn(len(kv), K, generator=gen) * x_scale).half().to(DEVICE)
    k = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    y = torch.full((len(kv), N), float("nan"), dtype=torch.float16, device=DEVICE)  # every element must be written
    sliced_gemv_cc(x, p, k, out=y, config=config)
    ref = reference(x, codes, s1, z1, kv)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(torch.float16) * ref.abs().max().item(), rtol=0)
    return p, x, k, y


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_one_token(k):
    run_case(781, 256, 128, [k])


def test_mixed_k_four_tokens():
    run_case(781, 256, 128, [3, 1, 4, 2])


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=64, GPI=1, SPLIT_K=3, num_warps=4, PF=1),  # 5 groups: uneven splits
    dict(BLOCK_N=32, GPI=2, SPLIT_K=2, num_warps=4, PF=0),  # odd group count per split with two per iteration
    dict(BLOCK_N=128, GPI=1, SPLIT_K=1, num_warps=4, PF=1),
    dict(BLOCK_N=32, GPI=1, SPLIT_K=2, num_warps=4, PF=1, GPK=1),  # 4 / 2 groups per iteration at k = 1 / 2
    dict(BLOCK_N=64, GPI=1, SPLIT_K=4, num_warps=4, PF=1, PDL=1),  # PDL is off in the interpreter
    dict(BLOCK_N=64, GPI=1, SPLIT_K=3, num_warps=4, PF=2),  # unrolled by two: odd group counts per split
    dict(BLOCK_N=32, GPI=2, SPLIT_K=1, num_warps=4, PF=2),  # 5 groups, two per step: a half past g_hi
    dict(BLOCK_N=128, GPI=1, SPLIT_K=2, num_warps=4, PF=2),
    dict(BLOCK_N=32, GPI=1, SPLIT_K=2, num_warps=2, PF=1, GPK=1),
])
def test_split_k_and_variants(config):
    run_case(130, 640, 128, [1, 3, 4, 2], config)


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=64, GPI=1, SPLIT_K=3, num_warps=4, PF=1, MMA=15),  # 5 groups, uneven splits, every k on tensor cores
    dict(BLOCK_N=32, GPI=1, SPLIT_K=1, num_warps=2, PF=0, MMA=15),
    dict(BLOCK_N=128, GPI=1, SPLIT_K=2, num_warps=4, PF=1, MMA=5),  # k = 1, 3 on the tensor cores, k = 2, 4 not
])
def test_tensor_core_path(config):
    """MMA: the tile (BN, 4) of chunks 2t, 2t + 1 per lane; in the interpreter each element's own word dots (the PTX,
    mma.sync across a lane quad, runs in the GPU tests)."""
    run_case(130, 640, 128, [1, 3, 4, 2], config)
    run_case(197, 256, 128, [4], config)


def test_tensor_core_path_falls_back_where_it_does_not_apply():
    """Group 64, or BLOCK_N not a multiple of 16 x warps: MMA is ignored (a tuned entry is keyed by shape only)."""
    run_case(130, 256, 64, [1, 3, 4, 2], dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1, MMA=15))
    run_case(130, 256, 128, [2, 4], dict(BLOCK_N=32, GPI=1, SPLIT_K=2, num_warps=4, PF=1, MMA=15))


def test_tensor_core_path_several_weights():
    run_multi((100, 72), 256, 128, [[2, 4], [1, 3]], dict(BLOCK_N=32, GPI=1, SPLIT_K=2, num_warps=2, PF=1, MMA=15))


@pytest.mark.parametrize("G", [1, 5, 10, 32, 100, 112])
@pytest.mark.parametrize("sk", [1, 3, 8, 16, 32, 64])
def test_split_count_leaves_no_split_empty(G, sk):
    """The kernels give split p the groups [p gps, (p + 1) gps) with gps = cdiv(G, SPLIT_K): every launched split
    must start inside [0, G) (an empty one asked v7 for an L2 prefetch of negative size) and together they cover G."""
    n = split_count(G, sk)
    gps = -(-G // n)
    assert 1 <= n <= min(sk, G)
    assert (n - 1) * gps < G <= n * gps
    assert n == min(sk, G) or (min(sk, G) - 1) * -(-G // min(sk, G)) >= G  # reduced only where a split was empty


def test_split_k_with_empty_splits_requested():
    """10 groups at split-K 8 would leave splits 5..7 without a group; the launch uses 5 splits, same result."""
    run_case(40, 320, 32, [1, 3, 4, 2], dict(BLOCK_N=32, GPI=1, SPLIT_K=8, num_warps=4, PF=1))


@pytest.mark.parametrize("kv", [[1], [2], [3], [4], [2, 4, 1, 3]])
def test_unrolled_prefetch_irregular(kv):
    """PF = 2 (loop unrolled by two, two register sets), N = 781, 5 groups per row: an odd group count, so the last
    step's second half lies past the split's end (its scale must be zeroed)."""
    run_case(781, 640, 128, kv, dict(BLOCK_N=64, GPI=1, SPLIT_K=1, num_warps=2, PF=2))


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=32, GPI=1, SPLIT_K=3, num_warps=4, PF=2),  # 10 groups in splits of 4, 4, 2
    dict(BLOCK_N=64, GPI=2, SPLIT_K=2, num_warps=4, PF=2),
    dict(BLOCK_N=32, GPI=1, SPLIT_K=2, num_warps=4, PF=2, GPK=1),
])
def test_unrolled_split_k(config):
    run_case(130, 1280, 128, [4, 1, 3, 2], config)


def run_multi(Ns, K, g, kmat, config=None):
    """Weights of one input in one launch: y = [x Ŵ_s,k[:, s]ᵀ]_s against the dense reference of each."""
    parts, packs = [], []
    for _ in Ns:
        seed = next(_SEED)
        parts.append(make_weight(Ns[len(packs)], K, g, seed, DEVICE))
        packs.append(pack_slices(*parts[-1][:3]))
    gen = torch.Generator().manual_seed(next(_SEED))
    M = len(kmat)
    x = torch.randn(M, K, generator=gen).half().to(DEVICE)
    k = torch.tensor(kmat, dtype=torch.int32, device=DEVICE)  # (M, S)
    y = torch.full((M, sum(Ns)), float("nan"), dtype=torch.float16, device=DEVICE)
    config = config or default_config_cc(M, sum(Ns), K, g)  # the same split-K for the single launches below
    sliced_gemv_cc(x, packs, k, out=y, config=config)
    ref = torch.cat([reference(x, c, s1, z1, [row[s] for row in kmat])
                     for s, (_, s1, z1, c) in enumerate(parts)], dim=1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(torch.float16) * ref.abs().max().item(), rtol=0)
    for s, p in enumerate(packs):  # each part equals its own single-weight launch at the same config
        lo = sum(Ns[:s])
        one = sliced_gemv_cc(x, p, k[:, s].contiguous(), config=config)
        assert torch.equal(y[:, lo:lo + Ns[s]], one)


@pytest.mark.parametrize("Ns,kmat,config", [
    ((96, 40, 40), [[3, 1, 4]], None),  # q/k/v-like, 40 rows: partial last tiles in the middle of y
    ((72, 130), [[2, 4], [1, 1]], dict(BLOCK_N=32, GPI=1, SPLIT_K=3, num_warps=4, PF=1)),  # gate/up-like, 2 tokens
    ((64, 64, 17), [[4, 2, 1]], dict(BLOCK_N=64, GPI=2, SPLIT_K=2, num_warps=4, PF=0)),
])
def test_several_weights_one_launch(Ns, kmat, config):
    run_multi(Ns, 384, 128, kmat, config)


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=64, GPI=1, SPLIT_K=4, SPLIT_K12=2, num_warps=4, PF=1),
    dict(BLOCK_N=64, GPI=1, SPLIT_K=5, SPLIT_K12=1, num_warps=4, PF=1),  # 5 groups: 5 splits at k >= 3, one below
])
def test_fewer_splits_at_small_k(config):
    """SPLIT_K12: tokens at k <= 2 reduce over fewer splits than the grid has (the rest of the tile's programs do
    nothing), in the same launch as tokens at k >= 3; the same output as a launch with that split count."""
    p, x, k, y = run_case(70, 640, 128, [1, 3, 4, 2], config)
    small = sliced_gemv_cc(x, p, k, config={c: v for c, v in config.items() if c != "SPLIT_K12"}
                           | dict(SPLIT_K=config["SPLIT_K12"]))
    lo = k <= 2
    assert torch.equal(y[lo], small[lo])
    run_multi((40, 24), 640, 128, [[3, 1], [2, 4]], config)  # the segments of one launch at their own k


def run_rope(H, KV, DH, K, kvec, config, pos, int8=False, fused=True, monkeypatch=None):
    """q/k/v of one token with ``rope=``: q rotated and the caches equal, bit for bit, to the plain launch followed by
    decode_step.rope_kv (the rotary kernel, tested against torch in test_decode_step.py); every other cache slot
    untouched. fused: the launch must do it itself (the module's rope_kv, its fallback, is made to fail)."""
    import importlib

    from mobiquant.kernels.act_int8 import quantize_x_int8
    from mobiquant.kernels.decode_step import rope_kv

    packs = [pack_slices(*make_weight(n, K, 128, next(_SEED), DEVICE)[:3]) for n in (H * DH, KV * DH, KV * DH)]
    gen = torch.Generator().manual_seed(next(_SEED))
    S = pos + 4
    x = torch.randn(1, K, generator=gen).half().to(DEVICE)
    cos = (torch.rand(S, DH, generator=gen) * 2 - 1).half().to(DEVICE)
    sin = (torch.rand(S, DH, generator=gen) * 2 - 1).half().to(DEVICE)
    kc, vc = (torch.randn(KV, S, DH, generator=gen).half().to(DEVICE) for _ in range(2))  # earlier slots: kept
    kr, vr = kc.clone(), vc.clone()
    p = torch.tensor([pos], device=DEVICE)
    k = torch.tensor([kvec], dtype=torch.int32, device=DEVICE)
    x8 = quantize_x_int8(x) if int8 else None
    if fused and monkeypatch is not None:  # (the package exports the function under the module's name)
        cc = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")
        monkeypatch.setattr(cc, "rope_kv", lambda *a: pytest.fail("the rotary ran as its own launch"))
    q = sliced_gemv_cc(x, packs, k, config=config, x_int8=x8, rope=(cos, sin, p, kc, vc))
    y = sliced_gemv_cc(x, packs, k, config=config, x_int8=x8)
    n0, n1 = H * DH, (H + KV) * DH
    qr = rope_kv(y[0, :n0], y[0, n0:n1], y[0, n1:], cos, sin, p, kr, vr)
    assert q.shape == (H, DH) and torch.isfinite(q).all()
    assert torch.equal(q, qr) and torch.equal(kc, kr) and torch.equal(vc, vr)
    assert not torch.equal(kc[:, pos], kc[:, pos - 1])  # slot pos was written (the others are compared above)


@pytest.mark.parametrize("H,KV,DH,kvec,config,int8", [
    (4, 2, 32, [3, 1, 4], dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1), False),  # two heads a tile
    (6, 2, 16, [2, 4, 1], dict(BLOCK_N=32, GPI=1, SPLIT_K=3, num_warps=4, PF=0), False),  # 3 splits of 2 groups
    (4, 1, 64, [1, 2, 3], dict(BLOCK_N=64, GPI=1, SPLIT_K=2, SPLIT_K12=1, num_warps=4, PF=1), False),
    (2, 2, 32, [4, 3, 2], dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1), True),  # int8 activations
])
def test_qkv_rope_in_the_launch(H, KV, DH, kvec, config, int8, monkeypatch):
    run_rope(H, KV, DH, 768, kvec, config, 5, int8, monkeypatch=monkeypatch)


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=16, GPI=1, SPLIT_K=2, num_warps=4, PF=1),  # a tile of half a head
    dict(BLOCK_N=64, GPI=1, SPLIT_K=1, num_warps=4, PF=1),  # no split-K: no partials to find the partner in
])
def test_qkv_rope_falls_back_to_the_rotary_kernel(config):
    run_rope(2, 1, 32, 256, [2, 1, 3], config, 3, fused=False)


def test_qkv_rope_rejects_bad_arguments():
    packs = [pack_slices(*make_weight(n, 128, 128, 3, DEVICE)[:3]) for n in (64, 32, 32)]
    x = torch.randn(1, 128).half().to(DEVICE)
    k = torch.ones(1, 3, dtype=torch.int32, device=DEVICE)
    kc = torch.zeros(1, 8, 32, dtype=torch.float16, device=DEVICE)
    cos = torch.zeros(8, 32, dtype=torch.float16, device=DEVICE)
    p = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="rope"):  # k and v have 32 rows, a cache of 2 heads needs 64
        sliced_gemv_cc(x, packs, k, rope=(cos, cos, p, kc.repeat(2, 1, 1), kc.repeat(2, 1, 1)))
    with pytest.raises(ValueError, match="rope"):  # two weights are not q/k/v
        sliced_gemv_cc(x, packs[:2], k[:, :2], rope=(cos, cos, p, kc, kc))
    with pytest.raises(ValueError, match="rope"):  # cos of another head size
        sliced_gemv_cc(x, packs, k, rope=(cos[:, :16], cos[:, :16], p, kc, kc))


def test_several_weights_reject_bad_arguments():
    p = pack_slices(*make_weight(16, 128, 128, 1, DEVICE)[:3])
    q = pack_slices(*make_weight(16, 256, 128, 2, DEVICE)[:3])
    x = torch.randn(1, 128).half().to(DEVICE)
    with pytest.raises(ValueError):
        sliced_gemv_cc(x, [p, p], torch.ones(1, dtype=torch.int32, device=DEVICE))  # k must be (M, 2)
    with pytest.raises(ValueError):
        sliced_gemv_cc(x, [p, q], torch.ones(1, 2, dtype=torch.int32, device=DEVICE))  # different K
    with pytest.raises(ValueError):
        sliced_gemv_cc(x, [p] * 4, torch.ones(1, 4, dtype=torch.int32, device=DEVICE))


def test_group_64():
    run_case(96, 384, 64, [2, 4])


def test_large_magnitude_no_inf():
    run_case(781, 256, 128, [1, 2, 3, 4], x_scale=1000.0, w_scale=0.02)


def test_rejects_bad_arguments():
    planes, s1, z1, _ = make_weight(16, 128, 128, 0, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(5, 128).half().to(DEVICE)
    with pytest.raises(ValueError):
        sliced_gemv_cc(x, p, torch.ones(5, dtype=torch.int32, device=DEVICE))  # more than 4 tokens
    with pytest.raises(TypeError):
        sliced_gemv_cc(x[:1].bfloat16(), p, torch.ones(1, dtype=torch.int32, device=DEVICE))


def test_dispatch_by_tokens_dtype_and_group():
    planes, s1, z1, _ = make_weight(200, 256, 128, 3, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(1, 256).half().to(DEVICE)
    k = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    assert torch.equal(sliced_linear(x, p, k), sliced_gemv_cc(x, p, k))
    xb = x.bfloat16()
    assert torch.equal(sliced_linear(xb, p, k), sliced_gemv(xb, p, k))
    x2 = torch.randn(2, 256).half().to(DEVICE)
    k2 = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    assert torch.equal(sliced_linear(x2, p, k2), sliced_gemv_mma(x2, p, k2))  # 2..16 fp16 tokens: v9
    assert torch.equal(sliced_linear(x2.bfloat16(), p, k2), sliced_gemv(x2.bfloat16(), p, k2))
    planes64, s64, z64, _ = make_weight(200, 256, 64, 4, DEVICE)  # groups of 64: v5
    p64 = pack_slices(planes64, s64, z64)
    assert torch.equal(sliced_linear(x2, p64, k2), sliced_gemv(x2, p64, k2))


# ------------------------------------------------------------------------------------------ the PTX, executed on CPU
def run_word_ptx(text, inputs):
    """asm_cc_text / asm_xsum_text with operands $1.. = inputs; returns $0 (fp32)."""
    return run_ptx(text, {f"${1 + i}": v for i, v in enumerate(inputs)})["$0"]


def _pairs(x16):
    """16 fp16 values (positions 0..15) -> 8 int32 pairs (2j low, 2j + 1 high)."""
    b = x16.astype(np.float16).view(np.uint16).astype(np.int64)
    return [int(b[2 * j] | (b[2 * j + 1] << 16)) for j in range(8)]


def _q(words, ks):
    """q of positions 0..15: register j holds slots (j, j + 8) = positions (2j, 2j + 1)."""
    out = []
    for pos in range(16):
        slot = pos // 2 + 8 * (pos % 2)
        Q = 0
        for w in words:
            Q = (Q << 2) | ((w >> (2 * slot)) & 3)
        out.append(Q * 2.0 ** -(2 * ks + 2) - 0.125)
    return np.array(out)


@pytest.mark.parametrize("ks", [1, 2, 3, 4])
def test_ptx_word_dot(ks):
    rng = np.random.default_rng(ks)
    text = asm_cc_text(ks)
    for trial in range(12):
        words = [int(w) for w in rng.integers(0, 2**32, ks)]
        x = rng.standard_normal(16) * (10.0 ** rng.integers(-2, 4))
        x16 = x.astype(np.float16)
        P = run_word_ptx(text, _pairs(x16) + words)
        q = _q(words, ks)
        exact = float((q * x16.astype(np.float64)).sum())
        assert abs(P - exact) <= 4e-3 * float(np.abs(q * x16).sum()) + 1e-6, (ks, trial, P, exact)


@pytest.mark.parametrize("ks", [1, 4])
def test_ptx_word_dot_no_overflow_at_fp16_max(ks):
    text = asm_cc_text(ks)
    for code in (0, M32):  # every q = -1/8, or every q at its maximum
        for sign in (1.0, -1.0):
            x16 = np.full(16, 65504.0 * sign, dtype=np.float16)
            P = run_word_ptx(text, _pairs(x16) + [code] * ks)
            assert np.isfinite(P)
            exact = float((_q([code] * ks, ks) * x16.astype(np.float64)).sum())
            assert abs(P - exact) <= 1e-3 * abs(exact)


def test_ptx_xsum():
    rng = np.random.default_rng(0)
    for scale in (1e-2, 1.0, 1e3, 4e4):
        x16 = (rng.standard_normal(16) * scale).clip(-65504, 65504).astype(np.float16)
        X = run_word_ptx(asm_xsum_text(), _pairs(x16))
        assert np.isfinite(X)
        assert abs(X - x16.astype(np.float64).sum() / 16) <= 2e-3 * np.abs(x16.astype(np.float64)).sum() / 16
    x16 = np.full(16, 65504.0, dtype=np.float16)
    assert np.isfinite(run_word_ptx(asm_xsum_text(), _pairs(x16)))


@pytest.mark.parametrize("ks", [1, 2, 3, 4])
def test_ptx_mma_on_a_warp(ks):
    """The tensor-core path's PTX on all 32 lanes (mma.sync fragments emulated, q registers converted with fp16
    rounding): the four lanes of row g's quad return quarters that add up to Σ q x over the group, for rows g and
    g + 8 of the fragment."""
    rng = np.random.default_rng(10 + ks)
    words = rng.integers(0, 2**32, (ks, 16, 8))  # plane, row, chunk
    x = (rng.standard_normal(128) * 3.0).astype(np.float16)
    lanes = mma_word_lanes(words, ks)
    for lane, r in enumerate(lanes):
        t = lane % 4
        for j in range(16):
            pos = 16 * (2 * t + j // 8) + 2 * (j % 8)
            r[f"${2 + 4 * ks + 2 * j}"] = r[f"${3 + 4 * ks + 2 * j}"] = _pairs(
                np.concatenate([x[pos:pos + 2], np.zeros(14, np.float16)]))[0]
    out = run_ptx_warp(asm_mma_text(ks), lanes)
    xf = x.astype(np.float64)
    for row in range(16):
        q = np.concatenate([_q([int(words[e, row, ch]) for e in range(ks)], ks) for ch in range(8)])
        g, reg = row % 8, "$0" if row < 8 else "$1"
        got = sum(out[4 * g + t][reg] for t in range(4))
        assert abs(got - float((q * xf).sum())) <= 1e-6 * float((np.abs(q) * np.abs(xf)).sum()), (ks, row)


def test_h2_constants_are_fp16():
    assert _h2(1024.0) == hex(0x64006400)
    assert struct.unpack("<e", struct.pack("<H", int(_h2(-64.125), 16) & 0xFFFF))[0] == -64.125


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("kv", [[1], [2], [3], [4], [4, 1, 3, 2]])
def test_gpu_llama_shapes(N, K, kv):
    run_case(N, K, 128, kv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Ns,kmat", [((4096, 1024, 1024), [[2, 1, 4]]), ((14336, 14336), [[1, 3]])])
def test_gpu_several_weights_llama_shapes(Ns, kmat):
    run_multi(Ns, 4096, 128, kmat)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("int8,config,fused", [
    (True, None, True),  # the tuned int8 entry (tiles of 128 rows on the ring, 8 splits): the PTX rotary
    (False, None, True),  # the tuned fp16 entry (128 rows, tensor cores from registers)
    (False, dict(BLOCK_N=128, GPI=1, SPLIT_K=16, num_warps=4, PF=1, PDL=1), True),  # the CUDA-core path
    (False, dict(BLOCK_N=64, GPI=1, SPLIT_K=8, num_warps=4, PF=1, MMA=15, PDL=1), False),  # half a head: fallback
])
def test_gpu_qkv_rope_llama_shapes(int8, config, fused, monkeypatch):
    run_rope(32, 8, 128, 4096, [2, 1, 4], config, 700, int8, fused=fused, monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K,sk", [(14336, 4096, 4), (4096, 14336, 16), (781, 4096, 3)])
@pytest.mark.parametrize("pf", [1, 2])
def test_gpu_prefetch_variants(N, K, sk, pf):
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=sk, num_warps=4, num_stages=1, PF=pf, PDL=1)
    run_case(N, K, 128, [1], cfg)
    run_case(N, K, 128, [4], cfg)
    run_case(N, K, 128, [3, 1, 4, 2], cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K,bn,nw,sk", [(14336, 4096, 128, 4, 4), (4096, 14336, 128, 4, 16), (6144, 4096, 64, 4, 8),
                                          (781, 4096, 32, 2, 3)])
@pytest.mark.parametrize("pf,mma", [(0, 15), (1, 15), (1, 6)])
def test_gpu_tensor_core_path(N, K, bn, nw, sk, pf, mma):
    """mma.sync on the lane quads: every k, mixed tokens, large-magnitude x, against the dense reference."""
    cfg = dict(BLOCK_N=bn, GPI=1, SPLIT_K=sk, num_warps=nw, num_stages=1, PF=pf, PDL=1, MMA=mma)
    for kv in ([1], [2], [3], [4], [3, 1, 4, 2]):
        run_case(N, K, 128, kv, cfg)
    run_case(N, K, 128, [1, 2, 3, 4], cfg, x_scale=1000.0, w_scale=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K,sk,sk12", [(28672, 4096, 8, 4), (781, 4096, 3, 1)])
def test_gpu_fewer_splits_at_small_k(N, K, sk, sk12):
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=sk, SPLIT_K12=sk12, num_warps=4, num_stages=1, PF=1, PDL=1, MMA=15)
    for kv in ([1], [2], [3], [4], [3, 1, 4, 2]):
        run_case(N, K, 128, kv, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_large_magnitude_no_inf():
    run_case(4096, 4096, 128, [1, 2, 3, 4], x_scale=1000.0, w_scale=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [dict(PF=1), dict(PF=2)])
def test_gpu_pdl_chain_in_graph_equals_eager(extra):
    pdl_chain_in_graph_equals_eager(sliced_gemv_cc, [2], dict(BLOCK_N=128, GPI=1, SPLIT_K=8, num_warps=4, **extra))
