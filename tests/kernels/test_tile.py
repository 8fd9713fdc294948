"""_tile.py: the inline PTX that unpacks k planes, checked on the CPU by executing its few instructions in Python.

The interpreter cannot run PTX, so the CPU kernel tests take the plain-shift path; this test closes the gap: the PTX
text is executed instruction by instruction on random words and must give BIAS + Q_k for every slot.
"""

import random

import pytest

pytest.importorskip("triton")

from kernel_helpers import run_ptx  # noqa: E402
from mobiquant.kernels import _tile  # noqa: E402


def unpack_halves(text, words):
    """The 16 halves $0..$15 that the unpacking PTX writes from plane words $16.."""
    regs = run_ptx(text, {f"${16 + i}": w for i, w in enumerate(words)})
    return [regs[f"${i}"] for i in range(16)]


@pytest.mark.parametrize("ks", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_ptx_unpack_gives_bias_plus_qk(ks, dtype):
    if dtype == "bf16" and ks == 4:
        pytest.skip("8-bit codes do not fit bf16's mantissa: the kernel takes the per-slice path there")
    magic = _tile.MAGIC[dtype] & 0xFFFF
    text = _tile._asm_text(ks, _tile.MAGIC[dtype])
    rng = random.Random(ks)
    for _ in range(20):
        words = [rng.getrandbits(32) for _ in range(ks)]
        halves = unpack_halves(text, words)
        for v in range(16):
            slot = v // 2 + 8 * (v % 2)  # register v // 2 holds the slots (j, j + 8)
            q = 0
            for w in words:
                q = (q << 2) | ((w >> (2 * slot)) & 3)
            assert halves[v] == magic | q, (ks, v, hex(halves[v]), q)
