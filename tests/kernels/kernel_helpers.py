"""Shared builders for the kernel tests: a quantized weight in the library's format and its exact dense Ŵ_k, and a
Python executor of the PTX subset that the unpacking / word-dot texts emit (the interpreter cannot run PTX)."""

import numpy as np
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


# ------------------------------------------------------------------------------------------ PTX, executed on CPU
M32 = 0xFFFFFFFF


def _lop3(a, b, c, lut):
    out = 0
    for i in range(32):
        idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        out |= ((lut >> idx) & 1) << i
    return out


def f16(bits):
    """fp16 bit pattern -> Python float."""
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def f16_bits(v):
    """Python float -> fp16 bit pattern, one rounding (round to nearest even; inf on overflow)."""
    with np.errstate(over="ignore"):
        return int(np.array([v], dtype=np.float64).astype(np.float16).view(np.uint16)[0])


def _f16x2(fn, *ops):
    lo = f16_bits(fn(*[f16(o & 0xFFFF) for o in ops]))
    hi = f16_bits(fn(*[f16(o >> 16) for o in ops]))
    return lo | (hi << 16)


def run_ptx(text, regs):
    """Execute ``text`` (shl/shr/and/lop3/mov, fp16x2 fma/mul/add, cvt.f32.f16, add.f32) on the register dict
    ``regs`` (name -> int, e.g. {"$16": word}); returns it with every written register. ``mov.b32 {lo, hi}, r``
    splits r into two 16-bit halves. fp16x2 math is exact in float64, then rounded once to fp16, as the GPU does."""
    regs = dict(regs)

    def val(tok):
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            dst, src = rest.split("},")
            lo, hi = (t.strip() for t in dst.strip("{ ").split(","))
            v = val(src)
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & M32
        elif op == "shr.u32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "and.b32":
            regs[a[0]] = val(a[1]) & val(a[2])
        elif op == "lop3.b32":
            regs[a[0]] = _lop3(val(a[1]), val(a[2]), val(a[3]), val(a[4]))
        elif op == "fma.rn.f16x2":
            regs[a[0]] = _f16x2(lambda p, q, r: p * q + r, val(a[1]), val(a[2]), val(a[3]))
        elif op == "mul.rn.f16x2":
            regs[a[0]] = _f16x2(lambda p, q: p * q, val(a[1]), val(a[2]))
        elif op == "add.rn.f16x2":
            regs[a[0]] = _f16x2(lambda p, q: p + q, val(a[1]), val(a[2]))
        elif op == "cvt.f32.f16":
            regs[a[0]] = f16(val(a[1]))
        elif op == "add.f32":
            regs[a[0]] = float(np.float32(regs[a[1]]) + np.float32(regs[a[2]]))
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return regs


def graph_replays_equal_eager(block, rnd, shapes, rounds=3, poison_slot=None):
    """Capture ``block(h0, r0, kc, vc, True)`` (one decode block's launches) in a CUDA graph, then at each of
    ``rounds`` replays on fresh inputs (every output, and the cache slot ``poison_slot`` if given, poisoned first)
    check it bit for bit against ``block(..., False)`` launched eagerly. ``shapes`` = (D, KV, S, DH); ``rnd(*shape,
    scale=)`` draws fresh fp16 inputs. The block returns its outputs with the 4 count tensors last. Returns the set
    of counts seen (callers check that they vary)."""
    D, KV, S, DH = shapes
    h0, r0 = rnd(1, D, scale=3.0), rnd(1, D)
    kc, vc = rnd(KV, S, DH), rnd(KV, S, DH)
    block(h0, r0, kc.clone(), vc.clone(), True)  # warm-up of both paths: compile, workspaces
    block(h0, r0, kc.clone(), vc.clone(), False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = block(h0, r0, kc, vc, True)
    seen = set()
    for _ in range(rounds):
        h0.copy_(rnd(1, D, scale=3.0))
        r0.copy_(rnd(1, D))
        kc0, vc0 = rnd(KV, S, DH), rnd(KV, S, DH)
        kr, vr = kc0.clone(), vc0.clone()
        ref = block(h0, r0, kr, vr, False)
        torch.cuda.synchronize()
        kc.copy_(kc0)
        vc.copy_(vc0)
        if poison_slot is not None:
            kc[:, poison_slot] = float("nan")
            vc[:, poison_slot] = float("nan")
        for t in outs:
            t.fill_(-7 if t.dtype == torch.int32 else float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(outs, ref):
            assert torch.equal(a, b)
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
        assert all(torch.isfinite(t).all() for t in ref if t.is_floating_point())
        seen |= set(torch.cat([c.cpu() for c in ref[-4:]]).tolist())
    return seen
