"""sliced_gemm (prefill, tokens grouped by slice count) and the dispatch in sliced_linear."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, make_weight, reference, tol  # noqa: E402
from mobiquant.kernels import pack_slices, sliced_gemm, sliced_linear, sliced_linear_ref  # noqa: E402

_SEED = iter(range(20_000, 30_000))


def run_case(N, K, g, kv, dtype, config=None):
    seed = next(_SEED)
    planes, s1, z1, codes = make_weight(N, K, g, seed, DEVICE)
    p = pack_slices(planes, s1, z1)
    gen = torch.Generator().manual_seed(seed + 7919)  # x independent of W (same seed would correlate them)
    x = torch.randn(len(kv), K, generator=gen).to(dtype).to(DEVICE)
    k = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    y = torch.full((len(kv), N), float("nan"), dtype=dtype, device=DEVICE)
    sliced_gemm(x, p, k, out=y, config=config)
    ref = reference(x, codes, s1, z1, kv)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(dtype) * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_k_many_tokens(dtype):
    g = torch.Generator().manual_seed(1)
    kv = torch.randint(1, 5, (45,), generator=g).tolist()
    run_case(781, 256, 128, kv, dtype, dict(BLOCK_M=16, BLOCK_N=64))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_uniform_k(k):
    run_case(100, 256, 128, [k] * 20, torch.float16, dict(BLOCK_M=16, BLOCK_N=64))


def test_segments_not_aligned_to_tiles():
    run_case(64, 128, 64, [4] * 7 + [1] * 9 + [3] * 5, torch.bfloat16, dict(BLOCK_M=16, BLOCK_N=32))


def test_segment_tiles_empty_level_and_clamped_k():
    """Each slice count gets its own m-tiles: segments of 13, 0, 9 and 11 tokens over 16-token tiles, in shuffled
    order; k = 0 and 6 clamp to 1 and 4."""
    g = torch.Generator().manual_seed(3)
    kv = [1] * 13 + [3] * 9 + [4] * 11
    kv = [kv[i] for i in torch.randperm(33, generator=g).tolist()]
    raw = list(kv)
    raw[raw.index(1)] = 0
    raw[raw.index(4)] = 6
    seed = next(_SEED)
    planes, s1, z1, codes = make_weight(96, 256, 64, seed, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(33, 256, generator=g).half().to(DEVICE)
    y = torch.full((33, 96), float("nan"), dtype=torch.float16, device=DEVICE)
    sliced_gemm(x, p, torch.tensor(raw, dtype=torch.int32, device=DEVICE), out=y, config=dict(BLOCK_M=16, BLOCK_N=32))
    ref = reference(x, codes, s1, z1, kv)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(torch.float16) * ref.abs().max().item(), rtol=0)


def test_one_segment():
    """All tokens at one slice count, M not a multiple of the tile."""
    run_case(72, 128, 128, [2] * 37, torch.float16, dict(BLOCK_M=16, BLOCK_N=32))


@pytest.mark.parametrize("E", [1, 2])
def test_weights_of_fewer_slices(E):
    """A weight of E < 4 slices: k above E clamps to E (one or two segments, E - 1 extra tile slots)."""
    seed = next(_SEED)
    planes, s1, z1, codes = make_weight(72, 128, 128, seed, DEVICE)
    p = pack_slices(planes[:E], s1, z1, (2,) * E)
    kv = [2, 1, 3, 1, 2, 2, 1, 3] * 3
    x = torch.randn(len(kv), 128, generator=torch.Generator().manual_seed(seed)).half().to(DEVICE)
    y = torch.full((len(kv), 72), float("nan"), dtype=torch.float16, device=DEVICE)
    sliced_gemm(x, p, torch.tensor(kv, dtype=torch.int32, device=DEVICE), out=y, config=dict(BLOCK_M=16, BLOCK_N=32))
    ref = reference(x, codes, s1, z1, [min(k, E) for k in kv])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), ref, atol=tol(torch.float16) * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("M", [1, 5, 17])
def test_dispatch_by_token_count(M):
    planes, s1, z1, codes = make_weight(72, 128, 128, M, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(M, 128).half().to(DEVICE)
    k = torch.randint(1, 5, (M,), dtype=torch.int32).to(DEVICE)
    bias = torch.randn(72).half().to(DEVICE)
    y = sliced_linear(x, p, k, bias)
    ref = sliced_linear_ref(x, p, k, bias)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-3 * ref.float().abs().max().item(), rtol=0)


def test_dispatch_int_k_and_batch_dims():
    planes, s1, z1, codes = make_weight(40, 128, 128, 9, DEVICE)
    p = pack_slices(planes, s1, z1)
    x = torch.randn(2, 3, 128).half().to(DEVICE)
    y = sliced_linear(x, p, 2)
    assert y.shape == (2, 3, 40)
    ref = reference(x.reshape(6, 128), codes, s1, z1, [2] * 6).reshape(2, 3, 40)
    torch.testing.assert_close(y.float().cpu(), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_prefill_llama_shape(dtype):
    g = torch.Generator().manual_seed(2)
    kv = torch.randint(1, 5, (1000,), generator=g).tolist()
    run_case(4096, 4096, 128, kv, dtype)
