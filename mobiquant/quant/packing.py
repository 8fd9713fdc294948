"""Bit-plane packing: each slice's codes in their own dense uint8 tensor.

Layout (the library's storage format; GPU kernels convert it to their own layout when a model moves to CUDA):

    codes (N, K) with values < 2^b  ->  plane (N, K * b / 8) uint8

The K codes of a row form one little-endian bit stream: code j occupies bits [j*b, (j+1)*b) of the row, least
significant bit first. For b in {1, 2, 4, 8} this is simply 8/b codes per byte, code j of a byte at bits
[(j mod 8/b) * b, ...). Other widths (3, 5, 6, 7) straddle bytes and need K*b to be a multiple of 8.
Keeping each slice in its own plane means that running at k slices reads k planes and nothing else.
"""

from __future__ import annotations

import torch


def _check(K: int, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8-bit codes, got {bits} bits")
    if (K * bits) % 8:
        raise ValueError(f"a row of {K} {bits}-bit codes is not a whole number of bytes")


def pack_nbit_u8(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer codes in [0, 2^bits) -> (N, K*bits/8) uint8."""
    N, K = codes.shape
    _check(K, bits)
    c = codes.to(torch.uint8)
    if 8 % bits == 0:  # whole codes per byte: OR the 8/bits codes of each byte into place
        per = 8 // bits
        c = c.reshape(N, K // per, per)
        out = c[..., 0].clone()
        for j in range(1, per):
            out |= c[..., j] << (j * bits)
        return out
    # general width: expand to the bit stream, then gather 8 bits per byte
    stream = ((c[..., None] >> torch.arange(bits, dtype=torch.uint8, device=c.device)) & 1).reshape(N, -1, 8)
    out = stream[..., 0].clone()
    for j in range(1, 8):
        out |= stream[..., j] << j
    return out


def unpack_nbit_u8(plane: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """(N, K*bits/8) uint8 -> (N, K) uint8 codes. Inverse of ``pack_nbit_u8``."""
    N = plane.shape[0]
    _check(K, bits)
    if plane.shape[1] * 8 != K * bits:
        raise ValueError(f"plane of shape {tuple(plane.shape)} does not hold {K} {bits}-bit codes per row")
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=plane.device)  # (8/bits,)
        return ((plane[..., None] >> shifts) & mask).reshape(N, K)
    stream = (plane[..., None] >> torch.arange(8, dtype=torch.uint8, device=plane.device)) & 1  # (N, K*b/8, 8)
    stream = stream.reshape(N, K, bits)
    weights = (1 << torch.arange(bits, device=plane.device)).to(torch.uint8)
    return (stream * weights).sum(-1).to(torch.uint8)
