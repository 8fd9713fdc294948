"""Shared builders for the kernel tests: a quantized weight in the library's format and its exact dense Ŵ_k."""

import torch

from mobiquant.quant import packing, slices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BITS = (2, 2, 2, 2)


def make_weight(N, K, group_size, seed, device="cpu", scale=1.0):
    """Random W quantized by the library: (planes, s_1 fp16, z_1 fp16, codes)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * scale
    codes, s1, z1 = slices.decompose(W, group_size, BITS)
    planes = [packing.pack_nbit_u8(c, 2).to(device) for c in codes]
    return planes, s1.half().to(device), z1.half().to(device), codes


def dense_ref(codes, s1, z1, k):
    """Ŵ_k (N, K) fp32 from the quantized parts, through the library's own reconstruction."""
    return slices.reconstruct(codes[:k], s1.float().cpu(), z1.float().cpu(), BITS)


def reference(x, codes, s1, z1, kv):
    """y (M, N) fp32: token t uses Ŵ_{k_t} (dense, from the library)."""
    W = {k: dense_ref(codes, s1, z1, k) for k in set(kv)}
    return torch.stack([x[t].float().cpu() @ W[k].t() for t, k in enumerate(kv)])


def tol(dtype):
    """Absolute tolerance relative to the output scale: 1e-3 (fp16) / 1e-2 (bf16), rtol = 0 (house style §3.11)."""
    return 1e-3 if dtype == torch.float16 else 1e-2
