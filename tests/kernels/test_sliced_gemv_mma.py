"""sliced_gemv_mma (decode v9, one plane at a time on the tensor cores, 1..16 fp16 tokens) against the dense reference.

CPU: Triton's interpreter (the PTX-free path: each output's group dot in fp32), small irregular shapes (N = 781),
every k, mixed k per token, 1..16 tokens, split-K and prefetch variants, weights of fewer slices, fresh random
inputs, NaN-poisoned outputs; the PTX texts run on all 32 lanes of a warp with the mma.sync fragment layouts
(kernel_helpers.run_ptx_warp), so the lane / fragment bookkeeping is checked without a GPU.
GPU (`pytest -m gpu tests/kernels`): LLaMA shapes at 1, 4, 8 and 16 tokens, large-magnitude x, a PDL chain in a graph.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import (  # noqa: E402
    DEVICE,
    f16,
    make_weight,
    pdl_chain_in_graph_equals_eager,
    reference,
    run_ptx,
    run_ptx_warp,
    tol,
)
from mobiquant.kernels import pack_slices  # noqa: E402
from mobiquant.kernels.sliced_gemv_mma import OFF, asm_aux_text, asm_plane_text, plane_regs_ptx, sliced_gemv_mma  # noqa: E402

_SEED = iter(range(60_000, 70_000))


def run_case(N, K, kv, config=None, x_scale=1.0, w_scale=1.0, slices=4):
    seed = next(_SEED)
    planes, s1, z1, codes = make_weight(N, K, 128, seed, DEVICE, w_scale)
    p = pack_slices(planes[:slices], s1, z1, (2,) * slices)
    gen = torch.Generator().manual_seed(seed + 7919)
    x = (torch.randn(len(kv), K, generator=gen) * x_scale).half().to(DEVICE)
    k = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    y = torch.full((len(kv), N), float("nan"), dtype=torch.float16, device=DEVICE)  # every element must be written
    sliced_gemv_mma(x, p, k, out=y, config=config)
    ref = reference(x, codes, s1, z1, [min(max(v, 1), slices) for v in kv])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(torch.float16) * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_one_token(k):
    run_case(781, 256, [k], dict(BLOCK_N=64, SPLIT_K=1, num_warps=4, PF=1))


@pytest.mark.parametrize("kv", [[3, 1, 4, 2], [2, 2, 2], [1, 4, 1, 1, 2, 3, 4, 2]])
def test_mixed_k_up_to_eight_tokens(kv):
    run_case(781, 256, kv, dict(BLOCK_N=32, SPLIT_K=1, num_warps=2, PF=1))


@pytest.mark.parametrize("M", [9, 16])
def test_two_column_blocks(M):
    """9..16 tokens: the second block of 8 (tokens 8 + g in the B fragment)."""
    kv = torch.randint(1, 5, (M,), generator=torch.Generator().manual_seed(M)).tolist()
    run_case(130, 384, kv, dict(BLOCK_N=32, SPLIT_K=2, num_warps=1, PF=1))


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=64, SPLIT_K=3, num_warps=4, PF=1),  # 5 groups: uneven splits
    dict(BLOCK_N=32, SPLIT_K=2, num_warps=1, PF=0),
    dict(BLOCK_N=128, SPLIT_K=5, num_warps=4, PF=1),  # one group per split
    dict(BLOCK_N=64, SPLIT_K=4, num_warps=2, PF=1, PDL=1),  # PDL is off in the interpreter
])
def test_split_k_and_variants(config):
    run_case(130, 640, [1, 3, 4, 2, 2], config)


@pytest.mark.parametrize("slices,kv", [(1, [1, 3]), (2, [2, 1, 4]), (3, [3, 4, 1])])
def test_fewer_slices_clamp_k(slices, kv):
    """Weights of 1..3 slices: counts above E (and below 1) are clamped, no plane past E is read."""
    run_case(100, 256, kv + [0], dict(BLOCK_N=32, SPLIT_K=1, num_warps=2, PF=1), slices=slices)


def test_rejects_bad_arguments():
    planes, s1, z1, _ = make_weight(64, 256, 128, 1, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(2, 256).half().to(DEVICE)
    k = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="tokens"):
        sliced_gemv_mma(torch.randn(17, 256).half().to(DEVICE), p, torch.ones(17, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="fp16"):
        sliced_gemv_mma(x.bfloat16(), p, k)
    with pytest.raises(ValueError, match="multiple of 16"):
        sliced_gemv_mma(x, p, k, config=dict(BLOCK_N=32, num_warps=4))
    with pytest.raises(ValueError, match="features"):
        sliced_gemv_mma(torch.randn(2, 128).half().to(DEVICE), p, k)
    planes64, s64, z64, _ = make_weight(64, 256, 64, 2, DEVICE)
    with pytest.raises(ValueError, match="groups of 128"):
        sliced_gemv_mma(x, pack_slices(planes64, s64, z64), k)


# ------------------------------------------------------------------------------- the PTX on a warp, executed on CPU
def _f16_pair(lo, hi):
    b = np.array([lo, hi], dtype=np.float16).view(np.uint16).astype(np.int64)
    return int(b[0] | (b[1] << 16))


def _codes(word):
    """Codes of positions 0..15 of a word (position 2j: slot j, 2j + 1: slot j + 8)."""
    return np.array([(word >> (2 * (pos // 2 + 8 * (pos % 2)))) & 3 for pos in range(16)])


def test_plane_registers_hold_offset_plus_code():
    """Register j = (OFF[j] + code of slot j, OFF[j] + code of slot j + 8), exactly, for random words."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = int(rng.integers(0, 2**32))
        regs = run_ptx("\n".join(plane_regs_ptx("$1", "q")), {"$1": w})
        for j in range(8):
            lo, hi = f16(regs[f"q{j}"] & 0xFFFF), f16(regs[f"q{j}"] >> 16)
            assert lo == OFF[j] + ((w >> (2 * j)) & 3) and hi == OFF[j] + ((w >> (2 * j + 16)) & 3)


def _warp_case(tb, rng, x_scale):
    """Random words of 16 rows (g, g + 8) x 8 chunks and x of 8 tb tokens x 128 positions, as the lanes hold them."""
    words = rng.integers(0, 2**32, (16, 8))  # row, chunk
    x = (rng.standard_normal((8 * tb, 128)) * x_scale).clip(-65504, 65504).astype(np.float16)  # token, position
    n_out = 4 * tb
    plane, aux = [], []
    for lane in range(32):
        g, t = divmod(lane, 4)
        pr = {f"${n_out + i}": int(words[r, c]) for i, (r, c) in
              enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t + 1)])}
        ar = {}
        for b in range(tb):
            for j in range(16):
                pos = 16 * (2 * t + j // 8) + 2 * (j % 8)
                v = _f16_pair(x[8 * b + g, pos], x[8 * b + g, pos + 1])
                pr[f"${n_out + 4 + 2 * (16 * b + j)}"] = pr[f"${n_out + 5 + 2 * (16 * b + j)}"] = v
                ar[f"${n_out + 16 * b + j}"] = v
        plane.append(pr)
        aux.append(ar)
    off = np.array([OFF[pos // 2 % 8] for pos in range(128)])  # position 2j, 2j + 1 of a chunk: register j
    A = np.stack([np.concatenate([_codes(int(words[r, c])) for c in range(8)]) for r in range(16)]).astype(float)
    xf = x.astype(np.float64)
    return plane, aux, A, off, xf


@pytest.mark.parametrize("tb", [1, 2])
@pytest.mark.parametrize("x_scale", [1e-2, 1.0, 3e4])
def test_ptx_plane_and_aux_on_a_warp(tb, x_scale):
    """Plane text: D[row, token] = Σ (o + r) x; aux text: Off = Σ o x and X = Σ x per token, in the lanes' output
    layout (lane 4 g + t: rows g, g + 8, tokens 8 b + 2t, 8 b + 2t + 1); D - Off = Σ r x to fp32 accuracy."""
    rng = np.random.default_rng(int(x_scale * 100) + tb)
    plane, aux, A, off, xf = _warp_case(tb, rng, x_scale)
    outp = run_ptx_warp(asm_plane_text(tb), plane)
    outa = run_ptx_warp(asm_aux_text(tb), aux)
    D = (A + off) @ xf.T  # (16 rows, tokens)
    Off, X = off @ xf.T, xf.sum(1)
    R = A @ xf.T
    scale = (np.abs(A + off) @ np.abs(xf).T).max()
    for lane in range(32):
        g, t = divmod(lane, 4)
        for b in range(tb):
            for par in range(2):
                o, tok = 2 * b + par, 8 * b + 2 * t + par
                d0, d1 = outp[lane][f"${2 * o}"], outp[lane][f"${2 * o + 1}"]
                assert abs(d0 - D[g, tok]) <= 1e-6 * scale and abs(d1 - D[g + 8, tok]) <= 1e-6 * scale
                a_off, a_x = outa[lane][f"${4 * b + par}"], outa[lane][f"${4 * b + 2 + par}"]
                assert abs(a_off - Off[tok]) <= 1e-6 * scale and abs(a_x - X[tok]) <= 1e-6 * np.abs(xf).sum()
                assert abs((d0 - a_off) - R[g, tok]) <= 2e-6 * scale


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (781, 4096)])
@pytest.mark.parametrize("kv", [[1], [2], [4], [4, 1, 3, 2], [2, 2, 2, 2], [1, 2, 3, 4, 4, 3, 2, 1],
                                [1, 2, 3, 4, 1, 2, 3, 4, 4, 4, 1, 1, 2, 3, 2, 1]])
def test_gpu_llama_shapes(N, K, kv):
    run_case(N, K, kv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", [dict(BLOCK_N=64, SPLIT_K=8, num_warps=4, PF=0, PDL=1),
                                    dict(BLOCK_N=128, SPLIT_K=3, num_warps=4, PF=1, PDL=1),
                                    dict(BLOCK_N=32, SPLIT_K=1, num_warps=2, PF=1, PDL=0)])
def test_gpu_configs_and_large_magnitude(config):
    for kv in ([3], [3, 1, 4, 2], list(range(1, 5)) * 4):
        run_case(4096, 4096, kv, config)
    run_case(4096, 4096, [1, 2, 3, 4, 4, 1], config, x_scale=1000.0, w_scale=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pdl_chain_in_graph_equals_eager():
    pdl_chain_in_graph_equals_eager(sliced_gemv_mma, [2, 1, 4, 3], dict(BLOCK_N=64, SPLIT_K=8, num_warps=4, PF=1))
