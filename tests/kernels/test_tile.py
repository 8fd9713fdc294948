"""_tile.py: the inline PTX that unpacks k planes, checked on the CPU by executing its few instructions in Python.

The interpreter cannot run PTX, so the CPU kernel tests take the plain-shift path; this test closes the gap: the PTX
text is executed instruction by instruction on random words and must give BIAS + Q_k for every slot.
"""

import random

import pytest

pytest.importorskip("triton")

from mobiquant.kernels import _tile  # noqa: E402

M32 = 0xFFFFFFFF


def _lop3(a, b, c, lut):
    out = 0
    for i in range(32):
        idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        out |= ((lut >> idx) & 1) << i
    return out


def run_ptx(text, inputs):
    """Execute the subset of PTX that _asm_text emits (shl/shr/and/lop3/mov); returns the 16 halves $0..$15."""
    regs, outs = {}, {}
    for i, v in enumerate(inputs):
        regs[f"${16 + i}"] = v

    def val(tok):
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32":
            dst, src = rest.split("},")
            lo, hi = (t.strip() for t in dst.strip("{ ").split(","))
            v = val(src)
            outs[lo], outs[hi] = v & 0xFFFF, v >> 16
            continue
        args = [a.strip() for a in rest.split(",")]
        if op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & M32
        elif op == "shr.u32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return [outs[f"${i}"] for i in range(16)]


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
        halves = run_ptx(text, words)
        for v in range(16):
            slot = v // 2 + 8 * (v % 2)  # register v // 2 holds the slots (j, j + 8)
            q = 0
            for w in words:
                q = (q << 2) | ((w >> (2 * slot)) & 3)
            assert halves[v] == magic | q, (ks, v, hex(halves[v]), q)
