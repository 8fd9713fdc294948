"""quant/int4pack.py: codes into torch's CPU int4 layout, checked exactly against Ŵ = s (Q - Z)."""

import pytest
import torch

from mobiquant.quant import int4pack

pytestmark = pytest.mark.skipif(not int4pack.available(), reason="this torch has no working CPU int4 matmul")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(16, 64), (192, 576), (576, 1536)])
@pytest.mark.parametrize("group_size", [32, 64])
def test_one_hot_rows_read_back_the_weight_exactly(bits, shape, group_size):
    """x = identity rows pick single weights: with s a power of 2 and Z a half-integer (both exact in bf16, as is
    every s (Q - Z) here) the kernel must return Ŵᵀ bit for bit: codes, offset and group layout all exact."""
    N, K = shape
    gen = torch.Generator().manual_seed(bits * N + group_size)
    G = K // group_size
    Q = torch.randint(0, 2**bits, (N, K), generator=gen)
    s = 2.0 ** torch.randint(-8, -2, (N, G), generator=gen).float()
    Z = torch.randint(0, 2**bits, (N, G), generator=gen).float() - 0.5
    W = (s[..., None] * (Q.float().reshape(N, G, group_size) - Z[..., None])).reshape(N, K)
    w4 = int4pack.pack_int4(Q, s, Z, bits, group_size)
    assert w4.packed.shape == (N, K // 2) and w4.scales_and_zeros.shape == (G, N, 2)
    rows = torch.arange(0, K, max(1, K // 96))
    y = int4pack.int4_linear(torch.eye(K)[rows], w4)
    assert torch.equal(y, W.T[rows])


def test_bias_dtype_and_leading_dims():
    N, K, g = 32, 128, 64
    Q = torch.randint(0, 16, (N, K))
    s, Z = torch.full((N, K // g), 0.25), torch.full((N, K // g), 7.5)
    w4 = int4pack.pack_int4(Q, s, Z, 4, g)
    x = torch.randn(2, 3, K, dtype=torch.float64)
    bias = torch.randn(N, dtype=torch.float64)
    y = int4pack.int4_linear(x, w4, bias)
    ref = x.bfloat16().double() @ (0.25 * (Q.double() - 7.5)).T + bias
    assert y.dtype == torch.float64 and y.shape == (2, 3, N)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def test_bad_inputs_are_rejected():
    s, Z = torch.ones(16, 1), torch.zeros(16, 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        int4pack.pack_int4(torch.full((16, 64), 4), s, Z, 2, 64)
    with pytest.raises(ValueError, match="1 to 4 bits"):
        int4pack.pack_int4(torch.zeros(16, 64, dtype=torch.long), s, Z, 5, 64)
    with pytest.raises(ValueError, match="no int4 layout"):
        int4pack.pack_int4(torch.zeros(8, 64, dtype=torch.long), s[:8], Z[:8], 2, 64)
    assert int4pack.fits(192, 576, 64) and not int4pack.fits(40, 576, 64) and not int4pack.fits(192, 576, 48)
