"""sliced_gemv (decode, 1..16 tokens) against the dense reference built from the library's quantized parts.

CPU: Triton's interpreter, small irregular shapes (N = 781), every k, mixed k per token, fp16 and bf16, split-K,
fresh random inputs, NaN-poisoned outputs. GPU (`pytest -m gpu tests/kernels`): LLaMA-sized shapes, the PTX path,
large-magnitude fp16 inputs, a CUDA graph whose slice counts change on the device without recapture.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, make_weight, reference, tol  # noqa: E402
from mobiquant.kernels import pack_slices, sliced_gemv, sliced_gemv_ref  # noqa: E402
from mobiquant.kernels.sliced_gemv import fill_split_k  # noqa: E402

_SEED = iter(range(10_000, 20_000))


def run_case(N, K, g, kv, dtype, config=None, x_scale=1.0, w_scale=1.0):
    seed = next(_SEED)
    planes, s1, z1, codes = make_weight(N, K, g, seed, DEVICE, w_scale)
    p = pack_slices(planes, s1, z1)
    gen = torch.Generator().manual_seed(seed + 7919)  # x independent of W (same seed would correlate them)
    x = (torch.randn(len(kv), K, generator=gen) * x_scale).to(dtype).to(DEVICE)
    k = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    y = torch.full((len(kv), N), float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every element must be written
    sliced_gemv(x, p, k, out=y, config=config)
    ref = reference(x, codes, s1, z1, kv)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(dtype) * ref.abs().max().item(), rtol=0)
    return p, x, k, y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_one_token(k, dtype):
    run_case(781, 256, 128, [k], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_k_per_token(dtype):
    run_case(781, 256, 128, [3, 1, 4, 2, 2], dtype)


@pytest.mark.parametrize("kv", [[2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], [1, 4] * 8])
def test_sixteen_tokens(kv):
    run_case(200, 128, 128, kv, torch.float16)


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=64, SPLIT_K=1, GPI=0, num_stages=3),
    dict(BLOCK_N=64, SPLIT_K=3, GPI=1, num_stages=1),
    dict(BLOCK_N=32, SPLIT_K=2, GPI=2, num_stages=1),
])
def test_split_k_and_variants(config):
    run_case(130, 640, 128, [1, 3, 4], torch.float16, config)  # 5 groups: uneven splits, odd group pairs


@pytest.mark.parametrize("programs,G,sk", [(64, 32, 8), (512, 32, 1), (32, 4, 2), (1, 3, 1), (100, 112, 8)])
def test_default_split_k_fills_the_gpu_with_two_groups_per_split(programs, G, sk):
    assert fill_split_k(programs, G) == sk


def test_group_64():
    run_case(96, 384, 64, [2, 4], torch.bfloat16)


def test_torch_reference_agrees():
    p, x, k, y = run_case(100, 256, 128, [1, 2, 4], torch.float16)
    ref = sliced_gemv_ref(x, p, k)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-3 * ref.float().abs().max().item(), rtol=0)


def test_rejects_bad_arguments():
    planes, s1, z1, _ = make_weight(16, 128, 128, 0, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(17, 128).half().to(DEVICE)
    with pytest.raises(ValueError):
        sliced_gemv(x, p, torch.ones(17, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        sliced_gemv(x[:2], p, torch.ones(2, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("kv", [[1], [2], [3], [4], [4, 1, 3, 2], list(range(1, 5)) * 4])
def test_gpu_llama_shapes(N, K, kv):
    run_case(N, K, 128, kv, torch.float16, x_scale=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_magnitude_no_inf(dtype):
    # |x| up to ~4e3 (products of x with 1024 + code reach 4e6, far past fp16): the fp32 accumulation and the
    # per-group epilogue keep the outputs (~1e3) finite and exact to the usual tolerance
    run_case(4096, 4096, 128, [1, 2, 3, 4], dtype, x_scale=1000.0, w_scale=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_budget_change_without_recapture():
    N, K = 4096, 4096
    planes, s1, z1, codes = make_weight(N, K, 128, 7, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(4, K, device=DEVICE).half()
    k = torch.tensor([1, 1, 1, 1], dtype=torch.int32, device=DEVICE)
    y = torch.empty(4, N, device=DEVICE, dtype=torch.float16)
    sliced_gemv(x, p, k, out=y)  # warm-up: compile, workspace
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sliced_gemv(x, p, k, out=y)
    for kv in ([1, 1, 1, 1], [4, 3, 2, 1], [2, 2, 2, 2]):
        k.copy_(torch.tensor(kv, dtype=torch.int32))
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = reference(x, codes, s1, z1, kv)
        torch.testing.assert_close(y.float().cpu(), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)
