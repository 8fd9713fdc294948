"""mobiquant.kernels: Triton kernels for sliced (MoBiQuant) linears. The only part of mobiquant that imports triton.

    from mobiquant.kernels import pack_slices, sliced_linear
    packed = pack_slices(planes, scale, zero)       # library format -> GPU layout (layout.py), once per layer
    y = sliced_linear(x, packed, k)                 # x (M, K) fp16/bf16, k (M,) int32 on the GPU

Files (one per concept, house style §3.8):
    layout.py       PackedSlices and the exact converter from/to the library's planes
    _tile.py        shared Triton pieces: PTX unpacking of k planes into BIAS + Q_k, the per-group loop
    sliced_gemv.py  decode kernel v5 (1..16 tokens, tensor cores, split-K) + launcher + torch reference
    sliced_gemv_cc.py  decode kernel v7 (1..4 fp16 tokens, CUDA cores, fp16x2 math); dispatch uses it at 1 token;
                    takes up to 3 weights of one input in one launch (and the v8 tensor-core path; with x_int8,
                    the int8 tensor-core path)
    act_int8.py     per-group int8 activations for that option (quantizer kernel + torch reference)
    bulk_ring.py    the shared-memory ring that v7's tensor-core paths can stream their words through (bulk copies)
    sliced_gemv_mma.py decode kernel v9 (1..16 fp16 tokens, one plane at a time on the tensor cores for all tokens);
                    dispatch uses it at 2..16 tokens
    sliced_gemm.py  prefill kernel (token permutation by slice count) + launcher + torch reference
    router.py       fused decode-time router of the linears sharing one input (split over K)
    decode_step.py  the decode step's glue between the linears: add + RMSNorm, rotary + KV-cache write, attention,
                    SiLU·up (one token)
    dispatch.py     sliced_linear(): picks the kernel by token count; sliced_linear_multi(): q/k/v or gate/up
    tuning.py       tuned configs per GPU (configs/*.json)

``HAS_TRITON`` is False when triton cannot be imported; then only the layout converter (pure torch) is usable.
"""

from __future__ import annotations

from .layout import PackedSlices, dense_weight, from_linear, pack_slices, unpack_codes, unpack_slices

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without the [gpu] extra
    HAS_TRITON = False

if HAS_TRITON:
    from .act_int8 import dequantize_x_int8, quantize_x_int8, quantize_x_int8_ref
    from .dispatch import sliced_linear, sliced_linear_ref
    from .sliced_gemm import sliced_gemm, sliced_gemm_ref
    from .sliced_gemv import sliced_gemv, sliced_gemv_ref
    from .sliced_gemv_cc import sliced_gemv_cc
    from .sliced_gemv_mma import sliced_gemv_mma

__all__ = [
    "HAS_TRITON", "PackedSlices", "pack_slices", "unpack_slices", "unpack_codes", "dense_weight", "from_linear",
    "sliced_linear", "sliced_linear_ref", "sliced_gemv", "sliced_gemv_ref", "sliced_gemv_cc", "sliced_gemv_mma",
    "sliced_gemm", "sliced_gemm_ref", "quantize_x_int8", "quantize_x_int8_ref", "dequantize_x_int8",
]
