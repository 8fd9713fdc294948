import numpy as np
import pytest
import torch

from mobiquant.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_keeps_endpoints_and_levels(bits):
    W = torch.randn(16, 128)
    Wq = rtn_quantize(W, bits, 64).reshape(16, 2, 64)
    Wg = W.reshape(16, 2, 64)
    torch.testing.assert_close(Wq.amin(-1), Wg.amin(-1).half().float(), rtol=0, atol=0)
    assert all(len(torch.unique(row)) <= 2**bits for row in Wq.reshape(-1, 64))
    # round-to-nearest: within half a step of the original (steps from fp16-rounded scales)
    step = ((Wg.amax(-1) - Wg.amin(-1)) / (2**bits - 1))[..., None]
    assert ((Wq - Wg).abs() <= step * 0.5 + 2e-3 * step + 1e-3 * Wg.abs().amax()).all()


def test_rtn_4bit_group32_is_ggml_q4_1():
    """RTN at 4 bits with groups of 32 is GGUF's Q4_1 (the embedded model's own format): same dequantized values."""
    gguf = pytest.importorskip("gguf")
    W = torch.randn(8, 256)
    packed = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_1)
    ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1))).float()
    ours = rtn_quantize(W, 4, 32)
    close = torch.isclose(ours, ref.reshape(W.shape), rtol=0, atol=1e-6)
    assert close.float().mean() > 0.99  # codes agree except at ties (GGML rounds (x - m) * (1/d))
