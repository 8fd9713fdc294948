# ruff: noqa: B023  (each timed closure runs inside the loop iteration that defines it)
"""The read ceiling of the batch-1 decode stack on the H100: how fast can *any* kernel read the bytes of the fused
32-layer stack (q/k/v, o, gate/up, down: 128 launches per token step, as the decode engine launches them), when it
does nothing with them but an XOR?

The issue's batch-1 targets (≤ 1.1 / 1.6 / 3.0 ms at k = 1 / 2 / 4) are fractions of the *copy* bandwidth of one
2 GiB copy. A decode step is 128 launches of 4-66 MB, and each launch pays its ramp-up and tail. This script times,
in one process and against the same copy bandwidth:

* ``one launch``: one streaming read of all the stack's bytes at k (the copy-bandwidth reading of the issue);
* ``128 launches``: the same bytes as the stack's 128 launches, each a streaming read of its unit's bytes (k planes,
  scales and zero points), tuned per unit (block size, loads per program, warps); plain launches, and with PDL
  (each program triggers its dependents first and waits only before its store, the most overlap a real kernel could
  have: it cannot use x before the wait);
* ``v7 + v8``: the committed batch-1 kernel (tuned configs), fused stack, as in benchmarks/kernels.py.

    OUT=/tmp python3 -P benchmarks/experiments/roofline_batch1.py    # writes $OUT/roofline_batch1_h100.json
"""

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl
from mobiquant.kernels.sliced_gemv_cc import (
    ASM_GDC_LAUNCH,
    ASM_GDC_WAIT,
    _load_sz_mma,
    _load_words_mma,
    _load_x_mma,
    sliced_gemv_cc,
)
from mobiquant.kernels.tuning import lookup

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))
UNITS = {"qkv": (6144, 4096), "o": (4096, 4096), "gu": (28672, 4096), "down": (4096, 14336)}  # (N, K) per launch
GROUP = 128


def unit_bytes(N: int, K: int, k: int) -> int:
    """k planes of 2-bit codes plus fp16 scale and zero point per group of 128: what a token at k slices reads."""
    return N * K // 4 * k + 2 * (K // GROUP) * N * 2


@triton.jit
def _read(ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr):
    """Program p XORs words [p·BLOCK·UNROLL, (p+1)·BLOCK·UNROLL) of ptr (all UNROLL loads issued before any use)."""
    pid = tl.program_id(0)
    one = tl.full((1,), 0, tl.int32)
    if PDL:
        tl.inline_asm_elementwise(ASM_GDC_LAUNCH, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
    base = pid.to(tl.int64) * (BLOCK * UNROLL)
    acc = tl.zeros((BLOCK,), tl.int32)
    for u in tl.static_range(UNROLL):
        offs = base + u * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, cache_modifier=".cg")
    if PDL:
        tl.inline_asm_elementwise(ASM_GDC_WAIT, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read_v8(w_ptr, s_ptr, z_ptr, x_ptr, out_ptr, N, G, plane_stride, stride_n, stride_g, KS: tl.constexpr,
             BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, DEPTH: tl.constexpr):
    """v8's loads with v8's grid, tile and lanes (8-byte word pairs of row-strided groups, s and z per row and
    group, x per chunk), XOR-ed instead of multiplied. DEPTH = 0: v8's one-group-ahead prefetch; DEPTH = d: d groups
    loaded per step, all issued before any use."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_c = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    gps = tl.cdiv(G, SPLIT_K)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, G)
    i_t = tl.arange(0, 4)
    w_ptrs = (w_ptr + n_c * stride_n)[:, None] + i_t[None, :] * 2  # (BN, 4): chunk 2t of group 0
    s_row = (s_ptr + n_c)[:, None]
    z_row = (z_ptr + n_c)[:, None]
    xi = x_ptr + i_t * 16
    acc = tl.zeros((BLOCK_N, 4), tl.int32)
    if DEPTH == 0:
        v = _load_words_mma(w_ptrs + g_lo * stride_g, plane_stride, KS, True)
        sv, zv = _load_sz_mma(s_row + g_lo * N, z_row + g_lo * N, True)
        for g in range(g_lo, g_hi):
            w, s, z = v, sv, zv
            gn = tl.minimum(g + 1, g_hi - 1)
            v = _load_words_mma(w_ptrs + gn * stride_g, plane_stride, KS, True)
            sv, zv = _load_sz_mma(s_row + gn * N, z_row + gn * N, True)
            acc = _xor_group(acc, w, s, z, _load_x_mma(xi + g * 64, True), KS)
    else:  # DEPTH groups' loads issued, then used
        for g in range(g_lo, g_hi, DEPTH):
            a = _ld_group(w_ptrs, s_row, z_row, xi, tl.minimum(g, g_hi - 1), N, plane_stride, stride_g, KS)
            if DEPTH > 1:
                b = _ld_group(w_ptrs, s_row, z_row, xi, tl.minimum(g + 1, g_hi - 1), N, plane_stride, stride_g, KS)
            if DEPTH > 2:
                c = _ld_group(w_ptrs, s_row, z_row, xi, tl.minimum(g + 2, g_hi - 1), N, plane_stride, stride_g, KS)
                d = _ld_group(w_ptrs, s_row, z_row, xi, tl.minimum(g + 3, g_hi - 1), N, plane_stride, stride_g, KS)
            acc = _xor_group(acc, a[0], a[1], a[2], a[3], KS)
            if DEPTH > 1:
                acc = _xor_group(acc, b[0], b[1], b[2], b[3], KS)
            if DEPTH > 2:
                acc = _xor_group(acc, c[0], c[1], c[2], c[3], KS)
                acc = _xor_group(acc, d[0], d[1], d[2], d[3], KS)
    tl.store(out_ptr + (pid_k * tl.num_programs(0) + pid_n) * BLOCK_N * 4 + tl.arange(0, BLOCK_N)[:, None] * 4
             + i_t[None, :], acc)


@triton.jit
def _ld_group(w_ptrs, s_row, z_row, xi, g, N, plane_stride, stride_g, KS: tl.constexpr):
    s, z = _load_sz_mma(s_row + g * N, z_row + g * N, True)
    return _load_words_mma(w_ptrs + g * stride_g, plane_stride, KS, True), s, z, _load_x_mma(xi + g * 64, True)


@triton.jit
def _xor_group(acc, w, s, z, xs, KS: tl.constexpr):
    """acc ^ every loaded value (only the KS planes: the unused ones repeat plane 1 and would cancel it)."""
    wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3 = w
    acc = acc ^ wa0 ^ wb0 ^ s ^ z
    if KS > 1:
        acc = acc ^ wa1 ^ wb1
    if KS > 2:
        acc = acc ^ wa2 ^ wb2
    if KS > 3:
        acc = acc ^ wa3 ^ wb3
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = xs
    return acc ^ (x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7 ^ x8 ^ x9 ^ x10 ^ x11 ^ x12 ^ x13 ^ x14 ^ x15)


ASM_LDW4 = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")


@triton.jit
def _ldw4_planes(wp, plane_stride, KS: tl.constexpr):
    """XOR of the 16-byte loads at wp of the KS planes."""
    a, b, c, d = tl.inline_asm_elementwise(ASM_LDW4, "=r,=r,=r,=r,l", [wp.to(tl.int64, bitcast=True)],
                                           dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    acc = a ^ b ^ c ^ d
    for e in tl.static_range(1, KS):
        a, b, c, d = tl.inline_asm_elementwise(ASM_LDW4, "=r,=r,=r,=r,l",
                                               [(wp + e * plane_stride).to(tl.int64, bitcast=True)],
                                               dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        acc = acc ^ a ^ b ^ c ^ d
    return acc


@triton.jit
def _read_v8_16(w_ptr, s_ptr, z_ptr, x_ptr, out_ptr, N, G, plane_stride, KS: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """``_read_v8`` (one group ahead, group-major) with 16-byte word loads: a lane reads its two rows' 8-byte
    pieces as one 16-byte load, as a layout that interleaves rows g and g + 8 of each mma tile would allow (a
    (BLOCK_N / 2, 4) tile of 16-byte pieces; the same bytes per group as v8's (BLOCK_N, 4) tile of 8-byte ones)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    n_c = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)
    gps = tl.cdiv(G, SPLIT_K)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, G)
    i_t = tl.arange(0, 4)
    r = tl.minimum(tl.arange(0, BLOCK_N // 2), (N - n0) // 2 - 1)  # row pairs of the tile (inside the plane)
    w_ptrs = w_ptr + n0 * 8 + r[:, None] * 16 + i_t[None, :] * 4  # (BN / 2, 4), group 0
    s_row = (s_ptr + n_c)[:, None]
    z_row = (z_ptr + n_c)[:, None]
    xi = x_ptr + i_t * 16
    acc = tl.zeros((BLOCK_N // 2, 4), tl.int32)
    acc_sz = tl.zeros((BLOCK_N, 1), tl.int32)
    acc_x = tl.zeros((1, 4), tl.int32)
    v = _ldw4_planes(w_ptrs + g_lo * (N * 8), plane_stride, KS)
    sv, zv = _load_sz_mma(s_row + g_lo * N, z_row + g_lo * N, True)
    for g in range(g_lo, g_hi):
        w, s, z = v, sv, zv
        gn = tl.minimum(g + 1, g_hi - 1)
        v = _ldw4_planes(w_ptrs + gn * (N * 8), plane_stride, KS)
        sv, zv = _load_sz_mma(s_row + gn * N, z_row + gn * N, True)
        acc = acc ^ w
        acc_sz = acc_sz ^ s ^ z
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load_x_mma(xi + g * 64, True)
        acc_x = acc_x ^ (x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7 ^ x8 ^ x9 ^ x10 ^ x11 ^ x12 ^ x13 ^ x14 ^ x15)
    base = out_ptr + (pid_k * tl.num_programs(0) + pid_n) * BLOCK_N * 8
    tl.store(base + tl.arange(0, BLOCK_N // 2)[:, None] * 4 + i_t[None, :], acc)
    tl.store(base + BLOCK_N * 2 + tl.arange(0, BLOCK_N)[:, None], acc_sz)
    tl.store(base + BLOCK_N * 4 + i_t[None, :], acc_x)


def read_v8(q, s, z, x, out, k, cfg, depth, layout="row"):
    E, N, W = q.shape
    G = W // 8
    sk = cfg["SPLIT_K"]
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), sk)
    if layout == "group16":
        _read_v8_16[grid](q, s, z, x, out, N, G, N * W, KS=k, BLOCK_N=cfg["BLOCK_N"], SPLIT_K=sk,
                          num_warps=cfg["num_warps"])
        return
    sn, sg = (W, 8) if layout == "row" else (8, N * 8)  # group-major: word (n, g, j) at (g N + n) 8 + j
    _read_v8[grid](q, s, z, x, out, N, G, N * W, sn, sg, KS=k, BLOCK_N=cfg["BLOCK_N"], SPLIT_K=sk, DEPTH=depth,
                   num_warps=cfg["num_warps"])


def read(buf: torch.Tensor, n: int, out: torch.Tensor, cfg: dict, pdl: bool = False):
    BLOCK, UNROLL, W = cfg["BLOCK"], cfg["UNROLL"], cfg["num_warps"]
    grid = (triton.cdiv(n, BLOCK * UNROLL),)
    _read[grid](buf, out, n, BLOCK=BLOCK, UNROLL=UNROLL, PDL=pdl, num_warps=W,
                **({"launch_pdl": True} if pdl else {}))


CONFIGS = [dict(BLOCK=b, UNROLL=u, num_warps=w) for b, w in ((512, 4), (1024, 4), (1024, 8), (2048, 8))
           for u in (1, 2, 4, 8)]


def contiguous(res, bw):
    """The read ceiling: contiguous streaming reads of the stack's bytes (per unit, as 128 launches, as one)."""
    res.update(units={}, stack=[])
    gen = torch.Generator(device="cuda").manual_seed(0)
    # One buffer per layer and unit, sized for k = 4 (a prefix of it for smaller k); 32 layers, as the stack.
    bufs = {u: [torch.randint(-2**31, 2**31 - 1, (unit_bytes(N, K, 4) // 4,), device="cuda", dtype=torch.int32,
                              generator=gen) for _ in range(32)] for u, (N, K) in UNITS.items()}
    part = torch.empty(1 << 20, device="cuda", dtype=torch.int32)
    # The reader must read every word once: the XOR of its partials equals the XOR of all words (numpy).
    b0, n0 = bufs["o"][0], unit_bytes(4096, 4096, 3) // 4
    want = int(np.bitwise_xor.reduce(b0[:n0].cpu().numpy()))
    for cfg in CONFIGS:
        part.fill_(12345)
        read(b0, n0, part, cfg)
        got = int(np.bitwise_xor.reduce(part[:triton.cdiv(n0, cfg["BLOCK"] * cfg["UNROLL"])].cpu().numpy()))
        assert got == want, (cfg, got, want)
    ks = (1, 2, 3, 4)
    best = {}
    for u, (N, K) in UNITS.items():
        for k in ks:
            n = unit_bytes(N, K, k) // 4
            t = {}
            for i, cfg in enumerate(CONFIGS):
                t[i] = KB.time_graph(lambda: [read(b, n, part, cfg) for b in bufs[u]])
            i = min(t, key=t.get)
            best[u, k] = CONFIGS[i]
            us = t[i] / 32 * 1e3
            gbps = unit_bytes(N, K, k) / (us * 1e-6) / 1e12
            res["units"][f"{u}:{k}"] = dict(cfg=CONFIGS[i], us=us, TBps=gbps, all_us={str(CONFIGS[j]): t[j] / 32 * 1e3
                                                                                       for j in t})
            print(f"read {u:5s} k={k}: {us:6.2f} us per launch ({gbps:.2f} TB/s)  best {CONFIGS[i]}", flush=True)
    layers = FS.quantized_layers()
    ours = {r["k"]: r["ms"] for r in FS.time_fused_stack({"v7+v8": (sliced_gemv_cc, None)}, layers, ks=ks)}
    del layers
    big = torch.randint(-2**31, 2**31 - 1, (sum(unit_bytes(N, K, 4) for N, K in UNITS.values()) * 32 // 4,),
                        device="cuda", dtype=torch.int32, generator=gen)
    print(f"{'k':>2} {'bytes GB':>9} {'copy-bw floor':>14} {'one launch':>11} {'128 launches':>13} {'128 + PDL':>10} "
          f"{'v7+v8':>8}", flush=True)
    for k in ks:
        tot = 32 * sum(unit_bytes(N, K, k) for N, K in UNITS.values())
        n_big = tot // 4
        one = min(KB.time_graph(lambda: read(big, n_big, part, c)) for c in CONFIGS)
        row = dict(k=k, bytes=tot, floor_ms=tot / bw * 1e3, one_launch_ms=one, ours_ms=ours[k])
        for pdl in (False, True):
            def run():
                for li in range(32):
                    for u, (N, K) in UNITS.items():
                        read(bufs[u][li], unit_bytes(N, K, k) // 4, part, best[u, k], pdl)
            row["launches_pdl_ms" if pdl else "launches_ms"] = min(KB.time_graph(run) for _ in range(3))
        res["stack"].append(row)
        print(f"{k:>2} {tot / 1e9:9.3f} {row['floor_ms']:11.3f} ms {one:8.3f} ms {row['launches_ms']:10.3f} ms "
              f"{row['launches_pdl_ms']:7.3f} ms {ours[k]:5.3f} ms", flush=True)



LAYOUTS = [(v.split(":")[0], int(v.split(":")[1])) for v in os.environ.get(  # reader variants: layout, depth
    "LAYOUTS", "row:0,row:1,row:2,row:4,group:0,group:2,group16:0").split(",")]
FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gu": ("gate", "up"), "down": ("down",)}


def pattern(res):
    """Per launch unit: v7 + v8 (tuned) against v8's loads alone (``_read_v8``) on the same grid, at each prefetch
    depth; µs per launch, 32 launches over 32 layers' weights in one graph."""
    layers = FS.quantized_layers()
    gen = torch.Generator(device="cuda").manual_seed(1)
    xin = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    out = torch.empty(1 << 22, device="cuda", dtype=torch.int32)
    res["pattern"] = []
    for u, (N, K) in UNITS.items():
        G = K // GROUP
        cfg = lookup("sliced_gemv_cc", 1, N, K)
        y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        rd = [(torch.randint(-2**31, 2**31 - 1, (4, N, K // 16), device="cuda", dtype=torch.int32, generator=gen),
               torch.rand(G, N, device="cuda", generator=gen).half(), torch.rand(G, N, device="cuda",
                                                                                generator=gen).half())
              for _ in range(32)]
        xi = xin[K].view(torch.int32)
        for kk in (1, 2, 3, 4):
            k = torch.full((1, len(FUSED[u])), kk, dtype=torch.int32, device="cuda")
            ws = [[L[n] for n in FUSED[u]] for L in layers]
            row = dict(unit=u, k=kk, cfg=cfg, floor_us=unit_bytes(N, K, kk) / (res["copy_bw_TBps"] * 1e6))
            row["ours_us"] = KB.time_graph(lambda: [sliced_gemv_cc(xin[K], w if len(w) > 1 else w[0],
                                                                   k if len(w) > 1 else k[:, 0], out=y, config=cfg)
                                                    for w in ws]) / 32 * 1e3
            for layout, depth in LAYOUTS:
                def run():
                    for q, s_, z_ in rd:
                        read_v8(q, s_, z_, xi, out, kk, cfg, depth, layout)
                row[f"read_{layout}_d{depth}_us"] = KB.time_graph(run) / 32 * 1e3
            if "units" in res and f"{u}:{kk}" in res["units"]:
                row["contiguous_us"] = res["units"][f"{u}:{kk}"]["us"]
            res["pattern"].append(row)
            cols = [(n.removeprefix("read_")[:-3], v) for n, v in row.items() if n.endswith("_us")]
            print(f"{u:5s} k={kk} " + "  ".join(f"{n} {v:6.2f}" for n, v in cols), flush=True)
        rd.clear()
    del layers


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC"))
    bw = KB.copy_bandwidth()
    res["copy_bw_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    parts = os.environ.get("PARTS", "contiguous,pattern").split(",")
    if "contiguous" in parts:
        contiguous(res, bw)
    if "pattern" in parts:
        pattern(res)
    (OUT / os.environ.get("OUT_NAME", "roofline_batch1_h100.json")).write_text(json.dumps(res, indent=1))

if __name__ == "__main__":
    main()
