"""act_int8: the per-group int8 activation quantizer (Triton, interpreter on the CPU) against its torch reference,
its byte order against the weight words' slots, and the dequantized values against x."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE  # noqa: E402
from mobiquant.kernels import dequantize_x_int8, quantize_x_int8, quantize_x_int8_ref  # noqa: E402
from mobiquant.kernels.act_int8 import XPERM  # noqa: E402
from mobiquant.kernels.layout import SLOT  # noqa: E402

_SEED = iter(range(70_000, 80_000))


def fresh_x(M, K, scale=1.0, dtype=torch.float16):
    g = torch.Generator().manual_seed(next(_SEED))
    x = torch.randn(M, K, generator=g) * scale
    x[:, 5] *= 40.0  # an outlier channel, as LLM activations have
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("M,K,g", [(1, 512, 128), (3, 384, 128), (2, 256, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_matches_reference(M, K, g, dtype):
    x = fresh_x(M, K, dtype=dtype)
    xq, xs = quantize_x_int8(x, g)
    rq, rs = quantize_x_int8_ref(x, g)
    q, r = xq.view(torch.int8).int(), rq.view(torch.int8).int()
    assert (q - r).abs().max().item() <= 1  # a tie may round the other way where the multiply-add is fused
    assert (q != r).float().mean().item() < 1e-2
    torch.testing.assert_close(xs[..., 0], rs[..., 0], rtol=1e-6, atol=0)
    # SX is the exact sum of the codes the kernel wrote
    assert torch.equal(xs[..., 1], q.reshape(M, K // g, g).sum(-1).float())


def test_dequantized_within_half_a_step():
    x = fresh_x(2, 512, scale=3.0)
    xq, xs = quantize_x_int8(x)
    xd = dequantize_x_int8(xq, xs)  # (M, K) in the in-features' order
    step = xs[..., :1].repeat_interleave(128, dim=1).reshape(2, 512)
    assert ((xd - x.float()).abs() <= step * 0.5 * (1 + 1e-5)).all()
    assert (xd.abs().reshape(2, 4, 128).amax(-1) - x.float().abs().reshape(2, 4, 128).amax(-1)).abs().max() < 1e-3


def test_byte_order_follows_the_weight_slots():
    """Byte b of int32 word j of a chunk holds the activation whose weight code sits in slot 4 b + j."""
    for d, p in enumerate(XPERM):
        j, b = divmod(d, 4)
        assert SLOT[p] == 4 * b + j
    x = torch.arange(16, dtype=torch.float32).repeat(1, 8).to(DEVICE) - 7.0  # K = 128, one group
    xq, _ = quantize_x_int8_ref(x)
    codes = xq.view(torch.int8).flatten()[:16].tolist()
    want = torch.floor((torch.arange(16.0) - 7.0) * (127 / 8.0) + 0.5).tolist()
    assert codes == [want[p] for p in XPERM]


def test_zero_group_and_fp16_extremes():
    x = torch.zeros(1, 256, dtype=torch.float16)
    x[0, 128:] = 65504.0
    x[0, 129] = -65504.0
    x = x.to(DEVICE)
    xq, xs = quantize_x_int8(x)
    q = xq.view(torch.int8).int()
    assert (q[0, :128] == 0).all() and xs[0, 0, 1].item() == 0.0
    assert torch.isfinite(xs).all()
    xd = dequantize_x_int8(xq, xs)
    torch.testing.assert_close(xd[0, 128:], x[0, 128:].float(), rtol=1e-6, atol=0)
    assert (xd[0, :128] == 0).all()


def test_out_buffers_and_bad_arguments():
    x = fresh_x(2, 256)
    out = (torch.empty(2, 64, dtype=torch.int32, device=DEVICE), torch.empty(2, 2, 2, device=DEVICE))
    xq, xs = quantize_x_int8(x, out=out)
    assert xq.data_ptr() == out[0].data_ptr() and xs.data_ptr() == out[1].data_ptr()
    with pytest.raises(ValueError, match="x_int8 must be"):
        quantize_x_int8(x, out=(out[0][:1], out[1]))
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_x_int8(x[:, :200])
    with pytest.raises(ValueError, match="power of 2"):
        quantize_x_int8(x, 96)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        quantize_x_int8(x[0])
