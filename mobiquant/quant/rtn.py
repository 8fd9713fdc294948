"""The common baseline: asymmetric round-to-nearest (RTN) with min/max endpoints, per group, any width.

Ŵ = s q + m with m = min(W_g), s = (max(W_g) - m) / (2^b - 1), q = round((W - m) / s) in [0, 2^b - 1]. The group's
extreme weights are representable exactly (unlike MoBiSlice's mid-rise levels). s and m are rounded to fp16, the
storage MoBiSlice uses too; with b = 4 and g = 32 this is GGUF's Q4_1.
"""

from __future__ import annotations

import torch

from .slices import MIN_SCALE, STORAGE_DTYPE, group_view


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Fake-quantized W (N, K) in fp32: the dequantized RTN weight."""
    Wg = group_view(W.float(), group_size)  # (N, G, g)
    m = Wg.amin(dim=-1, keepdim=True)
    s = ((Wg.amax(dim=-1, keepdim=True) - m) / (2**bits - 1)).clamp_min(MIN_SCALE)
    s, m = s.to(STORAGE_DTYPE).float(), m.to(STORAGE_DTYPE).float()
    q = torch.round((Wg - m) / s).clamp_(0, 2**bits - 1)
    return (s * q + m).reshape(W.shape)


def rtn_bits_per_weight(bits: int, group_size: int) -> float:
    return bits + 2 * 16 / group_size
