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


def _val(regs, tok):
    tok = tok.strip()
    if tok.startswith("0f"):  # fp32 literal
        return float(np.array([int(tok[2:], 16)], dtype=np.uint32).view(np.float32)[0])
    return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])


def _exec_line(line, regs):
    """One PTX instruction of the subset below on the register dict ``regs`` (in place)."""
    op, rest = line.split(None, 1)
    if op == "mov.b32" and rest.startswith("{"):
        dst, src = rest.split("},")
        lo, hi = (t.strip() for t in dst.strip("{ ").split(","))
        v = _val(regs, src)
        regs[lo], regs[hi] = v & 0xFFFF, v >> 16
        return
    a = [t.strip() for t in rest.split(",")]
    v = [_val(regs, t) for t in a[1:]]
    if op in ("mov.b32", "mov.f32"):
        regs[a[0]] = v[0]
    elif op == "shl.b32":
        regs[a[0]] = (v[0] << v[1]) & M32
    elif op == "shr.u32":
        regs[a[0]] = v[0] >> v[1]
    elif op == "and.b32":
        regs[a[0]] = v[0] & v[1]
    elif op == "lop3.b32":
        regs[a[0]] = _lop3(*v)
    elif op == "fma.rn.f16x2":
        regs[a[0]] = _f16x2(lambda p, q, r: p * q + r, *v)
    elif op == "mul.rn.f16x2":
        regs[a[0]] = _f16x2(lambda p, q: p * q, *v)
    elif op == "add.rn.f16x2":
        regs[a[0]] = _f16x2(lambda p, q: p + q, *v)
    elif op == "cvt.f32.f16":
        regs[a[0]] = f16(v[0])
    elif op == "add.f32":
        regs[a[0]] = float(np.float32(v[0]) + np.float32(v[1]))
    elif op == "mul.f32":
        regs[a[0]] = float(np.float32(v[0]) * np.float32(v[1]))
    elif op == "add.s32":
        regs[a[0]] = (v[0] + v[1]) & M32
    elif op == "mul.lo.s32":
        regs[a[0]] = (v[0] * v[1]) & M32
    elif op == "mad.lo.s32":
        regs[a[0]] = (v[0] * v[1] + v[2]) & M32
    elif op == "cvt.rn.f32.s32":
        regs[a[0]] = float(np.float32(_s32(v[0])))
    else:
        raise AssertionError(f"unexpected PTX op {op}")


def _s32(v):
    """A 32-bit register's bits as a signed integer."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _lines(text):
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line and line not in "{}" and not line.startswith(".reg"):
            yield line


def run_ptx(text, regs):
    """Execute ``text`` (shl/shr/and/lop3/mov, fp16x2 fma/mul/add, cvt.f32.f16, add/mul.f32) on the register dict
    ``regs`` (name -> int, e.g. {"$16": word}); returns it with every written register. ``mov.b32 {lo, hi}, r``
    splits r into two 16-bit halves. fp16x2 math is exact in float64, then rounded once to fp16, as the GPU does."""
    regs = dict(regs)
    for line in _lines(text):
        _exec_line(line, regs)
    return regs


def _mma_m16n8k16(line, lanes):
    """``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {d}, {a}, {b}, {c}`` across the 32 lanes (PTX ISA
    fragment layouts; lane 4 g + t): a0 = A[g][2t, 2t+1], a1 = A[g+8][..], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][..];
    b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][..]. Products and sums in
    float64, rounded once to fp32."""
    groups = [[t.strip() for t in grp.strip(" {}").split(",")] for grp in line.split(None, 1)[1].split("},")]
    d, a, b, c = groups
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for lane, regs in enumerate(lanes):
        g, t = divmod(lane, 4)
        h = [[f16(_val(regs, r) & 0xFFFF), f16(_val(regs, r) >> 16)] for r in a]
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = h[0], h[1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = h[2], h[3]
        hb = [[f16(_val(regs, r) & 0xFFFF), f16(_val(regs, r) >> 16)] for r in b]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = hb[0], hb[1]
        cv = [_val(regs, r) for r in c]
        C[g, 2 * t:2 * t + 2], C[g + 8, 2 * t:2 * t + 2] = cv[:2], cv[2:]
    D = (A @ B + C).astype(np.float32)
    for lane, regs in enumerate(lanes):
        g, t = divmod(lane, 4)
        for r, v in zip(d, (D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1])):
            regs[r] = float(v)


def _mma_m16n8k32_u8s8(line, lanes):
    """``mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {d}, {a}, {b}, {c}`` across the 32 lanes (PTX ISA fragment
    layouts for 8-bit integers; lane 4 g + t, byte i of a register = element i): a0 = A[g][4t..4t+3],
    a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..] (unsigned); b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]
    (signed); c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][..]. Exact integer sums, wrapped to 32 bits."""
    groups = [[t.strip() for t in grp.strip(" {}").split(",")] for grp in line.split(None, 1)[1].split("},")]
    d, a, b, c = groups
    A = np.zeros((16, 32), dtype=np.int64)
    B = np.zeros((32, 8), dtype=np.int64)
    C = np.zeros((16, 8), dtype=np.int64)

    def u8(r):
        return [(r >> (8 * i)) & 0xFF for i in range(4)]

    for lane, regs in enumerate(lanes):
        g, t = divmod(lane, 4)
        ra = [u8(_val(regs, r)) for r in a]
        A[g, 4 * t:4 * t + 4], A[g + 8, 4 * t:4 * t + 4] = ra[0], ra[1]
        A[g, 16 + 4 * t:20 + 4 * t], A[g + 8, 16 + 4 * t:20 + 4 * t] = ra[2], ra[3]
        rb = [[v - 256 if v >= 128 else v for v in u8(_val(regs, r))] for r in b]
        B[4 * t:4 * t + 4, g], B[16 + 4 * t:20 + 4 * t, g] = rb[0], rb[1]
        cv = [_s32(_val(regs, r)) for r in c]
        C[g, 2 * t:2 * t + 2], C[g + 8, 2 * t:2 * t + 2] = cv[:2], cv[2:]
    D = A @ B + C
    for lane, regs in enumerate(lanes):
        g, t = divmod(lane, 4)
        for r, v in zip(d, (D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1])):
            regs[r] = int(v) & M32


def mma_word_lanes(words, ks):
    """32 register dicts holding the plane words of a 16-row mma tile as the pack = 2 PTX texts take them
    (asm_mma_text, asm_mma8_text): words (ks, 16 rows, 8 chunks); lane 4 g + t gets rows g, g + 8 and chunks 2t,
    2t + 1 of each plane at $(2 + 4e) .. $(5 + 4e). The caller adds the activation operands."""
    lanes = []
    for lane in range(32):
        g, t = divmod(lane, 4)
        r = {}
        for e in range(ks):
            for i, (row, ch) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t + 1)]):
                r[f"${2 + 4 * e + i}"] = int(words[e, row, ch])
        lanes.append(r)
    return lanes


def run_ptx_warp(text, lanes):
    """``run_ptx`` for the 32 lanes of a warp in lock step (``lanes``: 32 register dicts), with mma.sync m16n8k16
    (fp16) and m16n8k32 (u8 x s8) taking their fragments from every lane. Returns the 32 dicts."""
    assert len(lanes) == 32
    lanes = [dict(r) for r in lanes]
    for line in _lines(text):
        if line.startswith("mma.sync") and ".m16n8k32." in line:
            _mma_m16n8k32_u8s8(line, lanes)
        elif line.startswith("mma.sync"):
            _mma_m16n8k16(line, lanes)
        else:
            for regs in lanes:
                _exec_line(line, regs)
    return lanes


def pdl_chain_in_graph_equals_eager(fn, kv, cfg, links=6, N=4096):
    """Six (``links``) square (N, N) sliced linears chained output to input, each launched by ``fn(x, packed, k,
    out=, config=)``: the chain launched with PDL (programmatic dependent launch) and captured in a CUDA graph, outputs
    NaN-poisoned before the replay, must equal the chain launched eagerly without PDL, bit for bit."""
    planes, s1, z1, _ = make_weight(N, N, 128, 11, DEVICE, 0.02)
    from mobiquant.kernels import pack_slices

    p = pack_slices(planes, s1, z1)
    k = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    M = len(kv)
    bufs = [torch.randn(M, N, device=DEVICE).half()] + [torch.empty(M, N, device=DEVICE).half() for _ in range(links)]

    def chain(c):
        for i in range(links):
            fn(bufs[i], p, k, out=bufs[i + 1], config=c)

    chain(dict(cfg, PDL=0))
    ref = bufs[-1].clone()
    chain(dict(cfg, PDL=1))  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(dict(cfg, PDL=1))
    for b in bufs[1:]:
        b.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(ref).all()
    assert torch.equal(bufs[-1], ref)


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
