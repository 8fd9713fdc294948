"""GPU layout of a sliced weight: int32 words of 16 two-bit codes, one plane per slice, scales transposed.

The library stores slice e of a weight (N, K) as ``plane_e`` (N, K/4) uint8, four codes per byte, LSB first
(mobiquant/quant/packing.py). The kernels read the same bytes per slice (2 bits per weight and slice, so a token at
k slices still costs k planes) but in a layout chosen for the unpacking, converted once when a model moves to CUDA:

    qweight (E, G, N, g/16) int32  word j of row n in group gi of plane e holds the codes of in-features
                                   gi g + 16 j + p, p = 0..15, the code of position p at bits [2 s, 2 s + 2) with
                                   s = SLOT[p] (a fixed permutation below). Group-major: a tile of rows of one
                                   group is one contiguous block (BLOCK_N x g/4 bytes), as s and z below
    scale   (G, N) fp16          s_1, transposed so that a tile of BLOCK_N rows of one group is one contiguous load
    zero    (G, N) fp16          z_1 (in units of s_1), transposed likewise

Why the permutation: the kernel turns a word into eight fp16x2 registers with one shift and one LOP3 each,
``((w >> 2 j) & 0x00030003) | 0x64006400`` = (1024 + code in slot j, 1024 + code in slot j + 8), so register j
holds the slots (j, j + 8). With k > 1 planes it first merges the k words of the same 16 weights into 2-, 4- or
8-bit fields (bit-plane shift-and-add, paper §4.3) and extracts Q_k the same way; the slot pairs are the same for
every k (see ``_tile.py``). Triton then assembles the 16 values of a word into 16 consecutive k positions with a
tree of ``tl.join`` calls; SLOT is the order that tree produces, computed here by replaying the tree on indices.

Why group-major (``benchmarks/experiments/roofline_batch1.py``, KERNEL_NOTES.md "Tenth session"): a decode program
reads a tile of rows one group at a time. With row-major words (N, K/16) each row's group (32 bytes at g = 128) lies a
whole row from the next row's, so a warp's loads touched as many separate lines as rows. v8's loads alone, with its
grid and no arithmetic, then took as long as the kernel; in this layout they were 1.3-2.6x faster, and the batch-1
stack went from 2.20 / 4.39 ms to 1.80 / 2.93 ms at k = 2 / 4 (with two configs retuned; outputs bit-equal).

Only uniform 2-bit slices (``slice_bits == (2,) * E``, E <= 4, the paper's default) have a kernel; other
configurations keep the library's torch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODES_PER_WORD = 16
SLICE_BITS = 2
MAX_SLICES = 4


def _join_tree_order() -> list[int]:
    """Output index v (0..15, asm register v // 2, half v % 2) found at each position p after the join tree.

    The kernel calls ``tl.join(L[i], L[i + len(L) // 2])`` for i < len(L) // 2 until one tensor is left, then
    reshapes the trailing (2, 2, 2, 2) into 16: replayed here with torch.stack on the indices 0..15.
    """
    L = [torch.tensor(v) for v in range(CODES_PER_WORD)]
    while len(L) > 1:
        h = len(L) // 2
        L = [torch.stack([L[i], L[i + h]], dim=-1) for i in range(h)]
    return L[0].reshape(-1).tolist()


# register v // 2 = j holds the slots (j, j + 8): the low half (v even) slot j, the high half (v odd) slot j + 8
SLOT = [v // 2 + 8 * (v % 2) for v in _join_tree_order()]  # SLOT[p] = bit slot of position p in its word


@dataclass
class PackedSlices:
    """A sliced linear weight in the kernels' layout (see the module docstring). Shapes: N out, K in, G = K / g."""

    qweight: torch.Tensor  # (E, G, N, g/16) int32, group-major
    scale: torch.Tensor  # (G, N) fp16
    zero: torch.Tensor  # (G, N) fp16
    group_size: int

    @property
    def num_slices(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[2]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * self.qweight.shape[3] * CODES_PER_WORD

    def to(self, device) -> PackedSlices:
        return PackedSlices(self.qweight.to(device), self.scale.to(device), self.zero.to(device), self.group_size)

    def nbytes(self, k: int | None = None) -> int:
        """Bytes a token at k slices reads: k planes plus scale and zero point."""
        k = self.num_slices if k is None else k
        return self.qweight[0].numel() * 4 * k + self.scale.numel() * 2 + self.zero.numel() * 2


def _check(planes, scale, zero, slice_bits) -> tuple[int, int, int]:
    if any(b != SLICE_BITS for b in slice_bits) or not 1 <= len(slice_bits) <= MAX_SLICES:
        raise ValueError(f"the kernels support 1..{MAX_SLICES} slices of {SLICE_BITS} bits, got {tuple(slice_bits)}")
    if len(planes) != len(slice_bits):
        raise ValueError(f"{len(planes)} planes for {len(slice_bits)} slices")
    N, KB = planes[0].shape
    K = KB * 8 // SLICE_BITS
    G = scale.shape[1]
    if K % CODES_PER_WORD or K % G or (K // G) % 32:
        raise ValueError(f"K={K} must be a multiple of 16 and the group size {K // max(G, 1)} a multiple of 32")
    for p in planes:
        if p.shape != (N, KB) or p.dtype != torch.uint8:
            raise ValueError(f"plane of shape {tuple(p.shape)} / {p.dtype}, expected ({N}, {KB}) uint8")
    if scale.shape != (N, G) or zero.shape != (N, G):
        raise ValueError(f"scale/zero must be ({N}, {G})")
    return N, K, G


def _unpack_u8(plane: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K/4) uint8 -> (N, K) int64 codes: the library's LSB-first order (same as packing.unpack_nbit_u8)."""
    shifts = torch.arange(0, 8, SLICE_BITS, device=plane.device)
    return ((plane.long()[..., None] >> shifts) & 3).reshape(plane.shape[0], K)


def pack_slices(planes, scale: torch.Tensor, zero: torch.Tensor, slice_bits=(2, 2, 2, 2)) -> PackedSlices:
    """Library format (planes [(N, K/4) uint8] * E, scale (N, G) fp16, zero (N, G) fp16) -> PackedSlices.

    Exact: codes are moved bit for bit, scale and zero are only transposed (``unpack_slices`` inverts it).
    """
    N, K, G = _check(planes, scale, zero, slice_bits)
    slot = torch.tensor(SLOT, device=planes[0].device)
    words = []
    for p in planes:
        c = _unpack_u8(p, K).reshape(N, K // CODES_PER_WORD, CODES_PER_WORD)  # (N, W, 16) by position p
        w = (c << (2 * slot)).sum(-1)  # (N, W) int64 < 2^32, disjoint bit fields
        w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
        words.append(w.reshape(N, G, K // G // CODES_PER_WORD).transpose(0, 1))  # (G, N, g/16): group-major
    return PackedSlices(torch.stack(words).contiguous(), scale.to(torch.float16).t().contiguous(),
                        zero.to(torch.float16).t().contiguous(), K // G)


def unpack_codes(packed: PackedSlices) -> torch.Tensor:
    """(E, N, K) int64 codes c_e from the GPU layout (torch; the reference for the kernels' unpacking)."""
    slot = torch.tensor(SLOT, device=packed.qweight.device)
    w = (packed.qweight.long() & 0xFFFFFFFF).transpose(1, 2)  # (E, N, G, g/16)
    c = (w[..., None] >> (2 * slot)) & 3  # (E, N, G, g/16, 16)
    return c.reshape(packed.num_slices, packed.out_features, packed.in_features)


def unpack_slices(packed: PackedSlices) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """PackedSlices -> the library's (planes, scale (N, G), zero (N, G)). Inverse of ``pack_slices``."""
    codes = unpack_codes(packed)  # (E, N, K)
    E, N, K = codes.shape
    shifts = torch.arange(0, 8, SLICE_BITS, device=codes.device)
    planes = [(codes[e].reshape(N, K // 4, 4) << shifts).sum(-1).to(torch.uint8) for e in range(E)]
    return planes, packed.scale.t().contiguous(), packed.zero.t().contiguous()


def dense_weight(packed: PackedSlices, k: int) -> torch.Tensor:
    """Ŵ_k (N, K) fp32 from the GPU layout: s_k (Q_k - Z_k), the same formula as mobiquant.quant.slices."""
    codes = unpack_codes(packed)[:k]
    Q = torch.zeros_like(codes[0])
    for c in codes:
        Q = (Q << SLICE_BITS) + c
    shift = SLICE_BITS * (k - 1)
    g = packed.group_size
    s = packed.scale.t().float().repeat_interleave(g, dim=1)  # (N, K)
    z = packed.zero.t().float().repeat_interleave(g, dim=1)
    return s * 2.0**-shift * (Q.float() - (z * 2.0**shift - 0.5))


def from_linear(layer) -> PackedSlices:
    """PackedSlices from a ``mobiquant.nn.linear.MoBiQuantLinear`` (on the layer's device)."""
    planes = [layer.plane(e) for e in range(1, layer.num_slices + 1)]
    return pack_slices(planes, layer.scale, layer.zero, layer.slice_bits)


__all__ = ["PackedSlices", "pack_slices", "unpack_slices", "unpack_codes", "dense_weight", "from_linear", "SLOT"]
