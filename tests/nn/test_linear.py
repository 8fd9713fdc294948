import pytest
import torch
import torch.nn.functional as F

from mobiquant import MoBiQuantConfig, MoBiQuantError, MoBiQuantLinear, precision
from mobiquant.quant import slices


def make(slice_bits=(2, 2, 2, 2), N=40, K=128, g=32, bias=True):
    lin = torch.nn.Linear(K, N, bias=bias)
    return lin, MoBiQuantLinear.from_linear(lin, MoBiQuantConfig(slice_bits=slice_bits, group_size=g))


@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_weight_k_is_the_slice_reconstruction(slice_bits):
    lin, q = make(slice_bits)
    codes, s_1, z_1 = slices.decompose(lin.weight.detach(), 32, slice_bits)
    for k in range(1, len(slice_bits) + 1):
        assert torch.equal(q.weight_k(k), slices.reconstruct(codes[:k], s_1, z_1, slice_bits))
        assert torch.equal(q.codes(k), codes[k - 1])


@pytest.mark.parametrize("dense_cache", [True, False])
def test_uniform_k_forward(dense_cache):
    lin, q = make()
    q.dense_cache = dense_cache
    x = torch.randn(3, 7, 128)
    for k in range(1, 5):
        ref = F.linear(x, q.weight_k(k), lin.bias)
        torch.testing.assert_close(q(x, k=k), ref, rtol=1e-5, atol=1e-5)
        with precision(k=k):
            torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(x), F.linear(x, q.weight_k(4), lin.bias), rtol=1e-5, atol=1e-5)  # default: all


@pytest.mark.parametrize("dense_cache", [True, False])
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_mixed_k_equals_stacked_uniform_rows(dense_cache, slice_bits):
    _, q = make(slice_bits)
    q.dense_cache = dense_cache
    E = len(slice_bits)
    x = torch.randn(2, 33, 128)
    k = torch.randint(1, E + 1, (2, 33))
    k[0, 0], k[1, -1] = 1, E  # both extremes present
    y = q(x, k=k)
    uniform = torch.stack([q(x, k=kk) for kk in range(1, E + 1)])  # (E, 2, 33, N)
    stacked = uniform.gather(0, (k - 1)[None, ..., None].expand(1, 2, 33, q.out_features))[0]
    torch.testing.assert_close(y, stacked, rtol=1e-5, atol=1e-5)


def test_dense_and_slice_paths_agree():
    _, q = make(bias=False)
    x = torch.randn(50, 128)
    k = torch.randint(1, 5, (50,))
    y_dense = q(x, k=k)
    q.dense_cache = False
    torch.testing.assert_close(q(x, k=k), y_dense, rtol=1e-5, atol=1e-5)


def test_sqnr_of_outputs_rises_with_k():
    lin, q = make(N=64, K=256, g=64)
    x = torch.randn(64, 256)
    y = lin(x)
    sqnr = [10 * torch.log10(y.pow(2).mean() / (q(x, k=k) - y).pow(2).mean()).item() for k in range(1, 5)]
    assert all(b > a + 9 for a, b in zip(sqnr, sqnr[1:])), sqnr


def test_bad_slice_counts():
    _, q = make()
    x = torch.randn(4, 128)
    for k in (0, 5):
        with pytest.raises(MoBiQuantError, match="1..4"):
            q(x, k=k)
    with pytest.raises(MoBiQuantError, match="1..4"):
        q(x, k=torch.tensor([1, 2, 7, 1]))
    with pytest.raises(MoBiQuantError, match="do not match"):
        q(x, k=torch.tensor([1, 2]))


def test_storage_bits_per_weight():
    _, q = make(g=64)
    assert q.bits_per_weight() == 8 + 0.5 and q.bits_per_weight(1) == 2.5
    stored = sum(b.numel() * b.element_size() * 8 for b in q.buffers()) / (q.in_features * q.out_features)
    assert stored == q.bits_per_weight()


def test_cache_is_built_on_use_and_dropped_on_move():
    _, q = make()
    x = torch.randn(2, 128)
    q(x, k=2)
    assert q.dense_cache_bytes() == 40 * 128 * 4
    q.double()
    assert q.dense_cache_bytes() == 0
    assert q(x.double(), k=2).dtype == torch.float64


def test_group_must_divide():
    with pytest.raises(MoBiQuantError, match="does not divide"):
        MoBiQuantLinear(100, 8, (2, 2), 64)


def test_set_dense_cache_build_fills_every_precision(tiny_llama):
    """build=True makes every precision's dense weight now, equal to weight_k; off frees them all."""
    from mobiquant import quantize_, quantized_linears, set_dense_cache_

    quantize_(tiny_llama, MoBiQuantConfig(group_size=32))
    set_dense_cache_(tiny_llama, True, build=True)
    for m in quantized_linears(tiny_llama).values():
        assert m.dense_cache_bytes() == m.num_slices * m.in_features * m.out_features * 4
        for k in range(1, m.num_slices + 1):
            assert torch.equal(m._dense[(k, torch.float32, torch.device("cpu"))], m.weight_k(k))
    set_dense_cache_(tiny_llama, False)
    assert all(m.dense_cache_bytes() == 0 for m in quantized_linears(tiny_llama).values())


def test_fp16_dense_dtype_is_close_and_never_overflows(tiny_llama):
    """set_dense_cache_(dtype=fp16): fp16 weights and products for fp32 inputs, close to the fp32 path; an output
    beyond fp16's range is recomputed in fp32 instead of turning into inf."""
    from mobiquant import quantize_, quantized_linears, set_dense_cache_

    quantize_(tiny_llama, MoBiQuantConfig(group_size=32))
    set_dense_cache_(tiny_llama, True, build=True, dtype=torch.float16)
    q = next(iter(quantized_linears(tiny_llama).values()))
    assert q.dense_cache_bytes() == q.num_slices * q.in_features * q.out_features * 2
    x = torch.randn(5, q.in_features)
    for k in range(1, q.num_slices + 1):
        ref = F.linear(x, q.weight_k(k), q.bias)
        y = q(x, k=k)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
        big = x * 1e5  # products far beyond 65504
        yb = q(big, k=k)
        assert torch.isfinite(yb).all()
        torch.testing.assert_close(yb, F.linear(big, q.weight_k(k), q.bias), rtol=1e-4, atol=1e-1)
    set_dense_cache_(tiny_llama, True)
    assert q.dense_dtype is None
