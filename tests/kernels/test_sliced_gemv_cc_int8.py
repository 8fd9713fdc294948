"""sliced_gemv_cc with int8 activations (``x_int8=``, the int8 tensor-core path) against the dense reference on the
dequantized activations (act_int8.dequantize_x_int8: the path's own arithmetic, so the tolerance is fp16 output
rounding), and against the fp16 path on x (the rounding of x to 8 bits per group: a loose bound).

CPU: Triton's interpreter (the PTX-free path: each element's own words, exact integer dot), N = 781, every k, mixed
k per token, split-K (uneven, fewer at k <= 2), prefetch on and off, several weights in one launch, fresh random
inputs, NaN-poisoned outputs; the PTX of the mma.sync m16n8k32 step on a whole warp (fragments emulated).
GPU (`pytest -m gpu tests/kernels`): LLaMA shapes, large-magnitude x, the tuned configs.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, make_weight, mma_word_lanes, reference, run_ptx_warp, tol  # noqa: E402
from mobiquant.kernels import dequantize_x_int8, pack_slices, quantize_x_int8, sliced_gemv_cc  # noqa: E402
from mobiquant.kernels.layout import SLOT  # noqa: E402
from mobiquant.kernels.sliced_gemv_cc import DEN8, asm_mma8_text  # noqa: E402

_SEED = iter(range(60_000, 70_000))


def run_case(Ns, K, kv, config=None, x_scale=1.0, w_scale=1.0):
    """One launch of len(Ns) weights (k (M, S) when S > 1) with int8 activations; checks every output."""
    seed = next(_SEED)
    parts = [make_weight(N, K, 128, seed + i, DEVICE, w_scale) for i, N in enumerate(Ns)]
    packs = [pack_slices(pl, s1, z1) for pl, s1, z1, _ in parts]
    gen = torch.Generator().manual_seed(seed + 7919)
    M = len(kv)
    x = (torch.randn(M, K, generator=gen) * x_scale).half().to(DEVICE)
    kt = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    if len(Ns) > 1:
        kt = kt.view(M, 1).repeat(1, len(Ns)).contiguous()
    x8 = quantize_x_int8(x)
    y = torch.full((M, sum(Ns)), float("nan"), dtype=torch.float16, device=DEVICE)
    sliced_gemv_cc(x, packs if len(Ns) > 1 else packs[0], kt, out=y, config=config, x_int8=x8)
    assert torch.isfinite(y).all()
    xd = dequantize_x_int8(*x8)
    ref = torch.cat([reference(xd, codes, s1, z1, kv) for _, s1, z1, codes in parts], dim=1)
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(torch.float16) * ref.abs().max().item(), rtol=0)
    ref_x = torch.cat([reference(x, codes, s1, z1, kv) for _, s1, z1, codes in parts], dim=1)
    assert ((y.float().cpu() - ref_x).norm() / ref_x.norm()).item() < 2e-2  # x at 8 bits per group of 128


@pytest.mark.parametrize("kv", [[1], [2], [3], [4], [3, 1, 4, 2]])
def test_every_k_and_mixed_tokens(kv):
    run_case((781,), 256, kv, dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1))


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=64, GPI=1, SPLIT_K=3, num_warps=4, PF=1),  # 5 groups: uneven splits
    dict(BLOCK_N=32, GPI=1, SPLIT_K=1, num_warps=2, PF=0),
    dict(BLOCK_N=128, GPI=1, SPLIT_K=4, SPLIT_K12=2, num_warps=4, PF=1),  # fewer splits at k <= 2
    dict(BLOCK_N=64, GPI=1, SPLIT_K=1, num_warps=4, PF=2),  # PF 2 (v7's unrolled loop) is PF 1 here; 5 groups
])
def test_split_k_and_prefetch(config):
    run_case((130,), 640, [1, 3, 4, 2], config)


def test_several_weights_one_launch():
    run_case((100, 72, 40), 256, [2, 4], dict(BLOCK_N=32, GPI=1, SPLIT_K=2, num_warps=2, PF=1))


def test_large_magnitude_no_inf():
    run_case((197,), 256, [1, 2, 3, 4], dict(BLOCK_N=64, GPI=1, SPLIT_K=2, num_warps=4, PF=1), x_scale=1000.0,
             w_scale=0.02)


def test_rejects_bad_arguments():
    planes, s1, z1, _ = make_weight(64, 256, 128, 0, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(1, 256).half().to(DEVICE)
    k = torch.ones(1, dtype=torch.int32, device=DEVICE)
    xq, xs = quantize_x_int8(x)
    with pytest.raises(ValueError, match="multiple of 16 x num_warps"):
        sliced_gemv_cc(x, p, k, config=dict(BLOCK_N=32, SPLIT_K=1, num_warps=4), x_int8=(xq, xs))
    with pytest.raises(ValueError, match="x_int8 must be"):
        sliced_gemv_cc(x, p, k, x_int8=(xq[:, :32], xs))
    with pytest.raises(ValueError, match="x_int8 must be"):
        sliced_gemv_cc(x, p, k, x_int8=(xq, xs.double()))
    planes64, s64, z64, _ = make_weight(64, 256, 64, 1, DEVICE)
    with pytest.raises(ValueError, match="groups of 128"):
        sliced_gemv_cc(x, pack_slices(planes64, s64, z64), k, x_int8=quantize_x_int8(x, 64))


@pytest.mark.parametrize("ks", [1, 2, 3, 4])
def test_ptx_mma8_on_a_warp(ks):
    """The int8 path's PTX on all 32 lanes (mma.sync m16n8k32 u8 x s8 emulated): every lane of row g's quad returns
    DEN8[k] Σ Q_k xq over the group's 128 in-features, for rows g and g + 8 of the fragment."""
    rng = np.random.default_rng(20 + ks)
    words = rng.integers(0, 2**32, (ks, 16, 8))  # plane, row, chunk
    xq = rng.integers(-127, 128, 128)  # activations by position
    pos_of_slot = {s: p for p, s in enumerate(SLOT)}

    def xword(chunk, j):  # byte b: the activation of slot 4 b + j (act_int8's order)
        return sum((int(xq[16 * chunk + pos_of_slot[4 * b + j]]) & 0xFF) << (8 * b) for b in range(4))

    lanes = mma_word_lanes(words, ks)
    for lane, r in enumerate(lanes):
        t = lane % 4
        for j in range(8):  # words 0..3 of chunk 2t, then of chunk 2t + 1 (each operand twice: pack = 2)
            r[f"${2 + 4 * ks + 2 * j}"] = r[f"${3 + 4 * ks + 2 * j}"] = xword(2 * t + j // 4, j % 4)
    out = run_ptx_warp(asm_mma8_text(ks), lanes)
    for row in range(16):
        Q = [sum(((int(words[e, row, p // 16]) >> (2 * SLOT[p % 16])) & 3) << (2 * (ks - 1 - e)) for e in range(ks))
             for p in range(128)]
        want = DEN8[ks] * int(np.dot(Q, xq))
        g, reg = row % 8, "$0" if row < 8 else "$1"
        for t in range(4):
            assert out[4 * g + t][reg] == want, (ks, row, t)


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Ns,K", [((4096,), 4096), ((14336, 14336), 4096), ((4096,), 14336),
                                  ((4096, 1024, 1024), 4096), ((781,), 4096)])
def test_gpu_llama_shapes_tuned_configs(Ns, K):
    for kv in ([1], [2], [3], [4], [3, 1, 4, 2]):
        run_case(Ns, K, kv)
    run_case(Ns, K, [1, 2, 3, 4], x_scale=1000.0, w_scale=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pf", [0, 1])
@pytest.mark.parametrize("sk,sk12", [(8, 2), (3, 3)])
def test_gpu_prefetch_and_splits(pf, sk, sk12):
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=sk, SPLIT_K12=sk12, num_warps=4, num_stages=1, PF=pf, PDL=1)
    for kv in ([1], [2], [4], [3, 1, 4, 2]):
        run_case((28672,), 4096, kv, cfg)
