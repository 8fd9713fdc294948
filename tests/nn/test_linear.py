import pytest
import torch
import torch.nn.functional as F

from mobiquant import MoBiQuantConfig, MoBiQuantError, MoBiQuantLinear, precision
from mobiquant.quant import int4pack, slices


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


@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_set_weight_in_passes_of_rows_gives_the_same_codes(slice_bits):
    """set_weight_ slices ``rows`` output rows at a time (memory): planes, scales and zero points equal one pass's,
    with clipping factors too, for pass sizes that do and do not divide N."""
    lin, one = make(slice_bits, N=40)
    W = lin.weight.detach()
    g = torch.Generator().manual_seed(3)
    clip = (torch.rand(40, 4, generator=g) * 0.3 + 0.7, torch.rand(40, 4, generator=g) * 0.3 + 0.7)
    scales = []
    for clips in ((None, None), clip):
        one.set_weight_(W, *clips, rows=40)
        scales.append(one.scale.clone())
        for rows in (1, 7, 16):
            q = MoBiQuantLinear(128, 40, slice_bits, 32)
            q.set_weight_(W, *clips, rows=rows)
            assert all(torch.equal(q.plane(e), one.plane(e)) for e in range(1, len(slice_bits) + 1))
            assert torch.equal(q.scale, one.scale) and torch.equal(q.zero, one.zero)
    assert not torch.equal(*scales)  # the clipping factors were applied, row by row


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


# ------------------------------------------------------------ the CPU int4 dense cache (set_dense_cache_(int4=True))
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # the embedded model's q/o, k/v, gate/up, down (N, K)
needs_int4 = pytest.mark.skipif(not int4pack.available(), reason="this torch has no working CPU int4 matmul")


def bf16_close(y, ref):
    """Within what bf16 activations, outputs, scales and zero points allow: ~3e-3 of the output's scale measured,
    against 1e-2 here; a wrong code, offset or group would be off by whole steps (tens of %)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.abs().max()
    assert (y - ref).abs().max() <= 1e-2 * scale, float((y - ref).abs().max() / scale)
    assert (y - ref).norm() <= 5e-3 * ref.norm(), float((y - ref).norm() / ref.norm())


@needs_int4
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_path_matches_the_fp32_dense_path(slice_bits, shape):
    """Every precision of at most 4 bits runs the int4 kernel and equals x Ŵ_kᵀ within bf16 tolerance, for one
    token (decode), several (a prompt) and mixed counts; nothing dense is built for those precisions."""
    from mobiquant import set_dense_cache_

    N, K = shape
    lin, q = make(slice_bits, N=N, K=K, g=64)
    set_dense_cache_(q, True, build=True, dtype=torch.float16, int4=True)
    low = [k for k, b in enumerate(q.precisions, start=1) if b <= 4]
    assert q.int4_slices == set(low) == {1, 2}
    gen = torch.Generator().manual_seed(N + K)
    with torch.no_grad():
        for k in low:
            for x in (torch.randn(1, K, generator=gen), torch.randn(2, 7, K, generator=gen)):
                bf16_close(q(x, k=k), F.linear(x, q.weight_k(k), lin.bias))
            assert (k, torch.float16, torch.device("cpu")) not in q._dense
        x = torch.randn(9, K, generator=gen)
        kt = torch.tensor([1, 2, 1, 2, 2, 1, 1, 2, 1])
        ref = torch.stack([F.linear(x[i], q.weight_k(int(kt[i])), lin.bias) for i in range(9)])
        bf16_close(q(x, k=kt), ref)


@needs_int4
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_int4_keeps_fp16_for_higher_precisions(slice_bits):
    """Precisions above 4 bits keep the fp16 dense weight (built), with the fp16 path's exact result; the cache
    holds int4 weights for the low precisions and fp16 for the rest."""
    from mobiquant import set_dense_cache_

    N, K = 192, 576
    lin, q = make(slice_bits, N=N, K=K, g=64)
    set_dense_cache_(q, True, build=True, dtype=torch.float16, int4=True)
    high = [k for k, b in enumerate(q.precisions, start=1) if b > 4]
    assert high and not q.int4_slices & set(high)
    x = torch.randn(3, K)
    with torch.no_grad():
        for k in high:
            W16 = q._dense[(k, torch.float16, torch.device("cpu"))]
            assert torch.equal(W16, q.weight_k(k).half())
            assert torch.equal(q(x, k=k), F.linear(x.half(), W16, lin.bias.half()).float())
    int4_bytes = N * K // 2 + (K // 64) * N * 2 * 2  # codes + bf16 (scale, zero) per group
    assert q.dense_cache_bytes() == 2 * int4_bytes + len(high) * N * K * 2
    set_dense_cache_(q, False)
    assert q.dense_cache_bytes() == 0 and not q.int4_slices


@needs_int4
def test_int4_cache_is_rebuilt_after_a_move_and_skipped_under_autograd():
    from mobiquant import set_dense_cache_

    lin, q = make(N=64, K=128, g=64)
    set_dense_cache_(q, True, build=True, int4=True)
    q.double()  # a cast: caches dropped, the choice kept
    assert q.dense_cache_bytes() == 0 and q.int4_slices == {1, 2}
    x = torch.randn(4, 128, dtype=torch.float64)
    with torch.no_grad():
        y = q(x, k=1)
    assert y.dtype == torch.float64 and 1 in q._int4
    bf16_close(y, F.linear(x, q.weight_k(1).double(), lin.bias.double()))
    xg = x.clone().requires_grad_()
    q(xg, k=2).sum().backward()  # recorded by autograd: the dense path, which has a backward
    torch.testing.assert_close(xg.grad, q.weight_k(2).double().sum(0).expand_as(xg))


def test_int4_falls_back_to_the_dense_weights(monkeypatch):
    """No working int4 op: a warning and fp16 for every precision, the same outputs as without int4. A layer whose
    shape the kernel does not take (out_features % 16) keeps its dense weights silently."""
    from mobiquant import set_dense_cache_

    lin, q = make(N=64, K=128, g=64)
    monkeypatch.setattr(int4pack, "available", lambda: False)
    with pytest.warns(RuntimeWarning, match="no working CPU int4"):
        set_dense_cache_(q, True, build=True, dtype=torch.float16, int4=True)
    assert not q.int4_slices and q.dense_cache_bytes() == 4 * 64 * 128 * 2
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = q(x, k=1)
        set_dense_cache_(q, True, build=True, dtype=torch.float16)
        assert torch.equal(y, q(x, k=1))
    monkeypatch.undo()
    _, odd = make(N=40, K=128, g=64)
    set_dense_cache_(odd, True, build=True, dtype=torch.float16, int4=True)
    assert not odd.int4_slices and odd.dense_cache_bytes() == 4 * 40 * 128 * 2
