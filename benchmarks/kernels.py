"""Benchmark of the sliced kernels on the LLaMA-3-8B linear stack (issue 5), against fp16 cuBLAS and int4 tinygemm.

    PYTHONUNBUFFERED=1 python benchmarks/kernels.py                 # full run: check, decode stack, prefill, JSON
    python benchmarks/kernels.py --layers 4 --quick                 # smoke: fewer layers, fewer variants
    python benchmarks/kernels.py --tune --out kernels/configs/h100.json   # sweep launch configs per shape
    python benchmarks/kernels.py --tune-mma --out kernels/configs/h100.json   # v9 configs per shape and batch
    python benchmarks/kernels.py --profile-one                      # one launch per k, for ncu instruction counts
    python benchmarks/kernels.py --sweep-cc --layers 4              # v7: checks, config sweep, 4-layer stack v5/v7
    ncu -k regex:cc_kernel python benchmarks/kernels.py --profile-cc   # v7 gate-shaped launches at k=1 and k=4
    python benchmarks/kernels.py --sweep-multi --layers 8           # v7: q/k/v and gate/up one launch vs separate
(on the device, run python with -P: this file's name shadows a module that transformers probes)

Stack: 32 layers x (q 4096x4096, k 1024x4096, v 1024x4096, o 4096x4096, gate 14336x4096, up 14336x4096,
down 4096x14336), random weights quantized by the library (mobiquant.quant.slices, group 128, slices 2/2/2/2),
then converted (mobiquant.kernels.pack_slices). One token step = the 224 linears, captured in one CUDA graph, timed by
replaying it (median of several batches of replays, CUDA events). Bytes are what each kernel must read (weights,
scales, zero points); % is of the measured device-to-device copy bandwidth (bytes read + written / time).
Correctness of every kernel variant is checked against the dense torch reference before any timing.
"""

# ruff: noqa: B023, B007  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from mobiquant.kernels import dequantize_x_int8, pack_slices, quantize_x_int8, sliced_gemm, sliced_gemv
from mobiquant.kernels.sliced_gemv import sliced_gemv_ref
from mobiquant.kernels.sliced_gemv_cc import sliced_gemv_cc
from mobiquant.kernels.sliced_gemv_mma import sliced_gemv_mma

from mobiquant.quant import packing, slices

SHAPES = {  # name: (N = out_features, K = in_features)
    "q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
    "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336),
}
GROUP = 128
BITS = (2, 2, 2, 2)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ building blocks
def quantize_layer(W: torch.Tensor):
    """fp16 W (N, K) on the GPU -> PackedSlices through the library's own format."""
    codes, s1, z1 = slices.decompose(W.float(), GROUP, BITS)
    planes = [packing.pack_nbit_u8(c, 2) for c in codes]
    return pack_slices(planes, s1.half(), z1.half(), BITS)


def int4_tinygemm(W: torch.Tensor):
    """(packed int4 weight, scales_and_zeros) for torch._weight_int4pack_mm, asymmetric, group 128."""
    N, K = W.shape
    Wg = W.float().reshape(N, K // GROUP, GROUP)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    q = ((Wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(u8, 8)
    return packed, sz


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy (median of 20)."""
    a = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ts = time_fn(lambda: b.copy_(a), reps=20)
    return 2 * (1 << 31) / (ts * 1e-3)


def time_fn(fn, reps=20, warm=3) -> float:
    """Median ms of fn() over reps, each timed with CUDA events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def capture_graph(run) -> torch.cuda.CUDAGraph:
    """run() captured once in a CUDA graph (after a warm-up that compiles and allocates its workspaces)."""
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        run()
    torch.cuda.synchronize()
    return g


def time_replays(g: torch.cuda.CUDAGraph, reps=10, inner=5) -> float:
    """Median ms per replay of a captured graph (batches of `inner` replays)."""
    return time_fn(lambda: [g.replay() for _ in range(inner)], reps=reps) / inner


def time_graph(run, reps=10, inner=5) -> float:
    """Capture run() once in a CUDA graph; median ms per replay (batches of `inner` replays)."""
    return time_replays(capture_graph(run), reps, inner)


# ------------------------------------------------------------------------------------------------ checks
def check(packed, M, kvals, dtype, fn=sliced_gemv, int8_act=False, **kw):
    """max |y - ref| / max |ref| and ||y - ref|| / ||ref|| against the fp32 dense reference; NaN-poisoned output.
    int8_act: x quantized per group (``x_int8=``), the reference on the dequantized x (the path's own arithmetic)."""
    N, K = packed.out_features, packed.in_features
    x = torch.randn(M, K, device="cuda").to(dtype)
    k = torch.tensor(kvals, dtype=torch.int32, device="cuda")
    y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    xr = x.float()
    if int8_act:
        kw["x_int8"] = quantize_x_int8(x)
        xr = dequantize_x_int8(*kw["x_int8"])
    fn(x, packed, k, out=y, **kw)
    torch.cuda.synchronize()
    ref = sliced_gemv_ref(xr, packed, k).float()
    err = (y.float() - ref)
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item(), bool(torch.isfinite(y).all())


def mixed_k(M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 5, (M,), generator=g).tolist()


def stack_bytes(kind, k=None):
    tot = 0
    for N, K in SHAPES.values():
        G = K // GROUP
        if kind == "ours":
            tot += N * K // 4 * k + 2 * G * N * 2
        elif kind == "fp16":
            tot += N * K * 2
        elif kind == "int4":
            tot += N * K // 2 + G * N * 2 * 2
    return tot


# ------------------------------------------------------------------------------------------------ main parts
def run_checks(layers, results):
    log("== correctness (max err / max |ref|, ||err|| / ||ref||; NaN-poisoned outputs)")
    worst = 0.0
    L0 = layers[0]
    for name, (N, K) in SHAPES.items():
        if name in ("v", "up"):
            continue
        p = L0[name]["ours"]
        for dtype in (torch.float16, torch.bfloat16):
            cases = [(1, [1]), (1, [2]), (1, [3]), (1, [4]), (4, [4, 4, 4, 4]), (4, mixed_k(4)), (16, mixed_k(16, 1))]
            for M, kv in cases:
                mx, rel, fin = check(p, M, kv, dtype)
                worst = max(worst, rel)
                ok = fin and mx < (2e-3 if dtype == torch.float16 else 1.6e-2)
                results["checks"].append(dict(kernel="gemv", shape=name, dtype=str(dtype), M=M, k=kv, max_rel=mx,
                                              norm_rel=rel, finite=fin, ok=ok))
                if not ok:
                    log(f"FAIL gemv {name} {dtype} M={M} k={kv}: max {mx:.2e} norm {rel:.2e} finite {fin}")
            if dtype == torch.float16:  # fp16-only kernels: v7 + v8 (batch 1 every k, 4 tokens mixed), v9 (2..16)
                cc_cases = [(1, [1]), (1, [2]), (1, [3]), (1, [4]), (4, mixed_k(4))]
                fp16_cases = [("gemv_cc", sliced_gemv_cc, cc_cases, {}),
                              ("gemv_cc_int8_act", sliced_gemv_cc, cc_cases, dict(int8_act=True)),
                              ("gemv_mma", sliced_gemv_mma, [(2, [1, 4]), (4, [2] * 4), (4, mixed_k(4)),
                                                             (8, mixed_k(8, 4)), (16, mixed_k(16, 1))], {})]
                for kname, fn, cases16, opts in fp16_cases:
                    for M, kv in cases16:
                        mx, rel, fin = check(p, M, kv, dtype, fn=fn, **opts)
                        worst = max(worst, rel)
                        ok = fin and mx < 2e-3
                        results["checks"].append(dict(kernel=kname, shape=name, dtype=str(dtype), M=M, k=kv,
                                                      max_rel=mx, norm_rel=rel, finite=fin, ok=ok))
                        if not ok:
                            log(f"FAIL {kname} {name} M={M} k={kv}: max {mx:.2e} norm {rel:.2e} finite {fin}")
            M = 300
            mx, rel, fin = check(p, M, mixed_k(M, 2), dtype, fn=sliced_gemm)
            ok = fin and mx < (2e-3 if dtype == torch.float16 else 1.6e-2)
            results["checks"].append(dict(kernel="gemm", shape=name, dtype=str(dtype), M=M, k="mixed", max_rel=mx,
                                          norm_rel=rel, finite=fin, ok=ok))
            if not ok:
                log(f"FAIL gemm {name} {dtype} M={M}: max {mx:.2e} norm {rel:.2e} finite {fin}")
    nfail = sum(not c["ok"] for c in results["checks"])
    log(f"   {len(results['checks'])} checks, {nfail} failed, worst norm-relative error {worst:.2e}")
    return nfail == 0


def decode_stack(layers, results, batches, bw, quick=False):
    log("== decode: whole stack per token step, CUDA graph")
    rows = results["decode"]
    for M in batches:
        xin = {K: torch.randn(M, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
        outs = {name: torch.empty(M, N, device="cuda", dtype=torch.float16) for name, (N, K) in SHAPES.items()}
        # fp16 cuBLAS
        def run_fp16():
            for L in layers:
                for name, (N, K) in SHAPES.items():
                    torch.mm(xin[K], L[name]["fp16"].t(), out=outs[name])
        ms = time_graph(run_fp16)
        rows.append(dict(kernel="cublas_fp16", M=M, k="-", ms=ms, bytes=stack_bytes("fp16") * len(layers),
                         pct_copy_bw=100 * stack_bytes("fp16") * len(layers) / (ms * 1e-3) / bw))
        log(f"   M={M:2d} cublas fp16       {ms:7.3f} ms  {rows[-1]['pct_copy_bw']:5.1f} %")
        # int4 tinygemm
        if "int4" in layers[0]["q"]:
            xb = {K: v.to(torch.bfloat16) for K, v in xin.items()}
            def run_int4():
                for L in layers:
                    for name, (N, K) in SHAPES.items():
                        w, sz = L[name]["int4"]
                        torch._weight_int4pack_mm(xb[K], w, GROUP, sz)
            ms = time_graph(run_int4)
            rows.append(dict(kernel="tinygemm_int4", M=M, k="-", ms=ms, bytes=stack_bytes("int4") * len(layers),
                             pct_copy_bw=100 * stack_bytes("int4") * len(layers) / (ms * 1e-3) / bw))
            log(f"   M={M:2d} tinygemm int4     {ms:7.3f} ms  {rows[-1]['pct_copy_bw']:5.1f} %")
        kcases = [[1] * M, [2] * M, [3] * M, [4] * M]
        if M > 1:
            kcases.append(mixed_k(M, 3))
        if quick:
            kcases = [[1] * M, [2] * M, [4] * M] + ([mixed_k(M, 3)] if M > 1 else [])
        for kv in kcases:
            k = torch.tensor(kv, dtype=torch.int32, device="cuda")
            kmax = max(kv)
            b = stack_bytes("ours", kmax) * len(layers)
            label = str(kv[0]) if len(set(kv)) == 1 else "mixed" + str(kv)

            def each_linear(fn):
                def run():
                    for L in layers:
                        for name, (N, K) in SHAPES.items():
                            fn(xin[K], L[name]["ours"], k, out=outs[name])
                return run

            def add_row(kernel, tag, ms):
                rows.append(dict(kernel=kernel, M=M, k=label, kmax=kmax, mean_k=sum(kv) / M, ms=ms, bytes=b,
                                 pct_copy_bw=100 * b / (ms * 1e-3) / bw))
                log(f"   M={M:2d} {tag} k={label:<12s} {ms:7.3f} ms  {rows[-1]['pct_copy_bw']:5.1f} %")

            add_row("sliced_gemv", "sliced", time_graph(each_linear(sliced_gemv)))
            if M > 1:  # v9, the kernel dispatch uses for 2..16 fp16 tokens (tuned configs)
                add_row("sliced_gemv_mma", "v9 mma", time_graph(each_linear(sliced_gemv_mma)))
            if M == 1:  # v7 + v8, the kernel dispatch uses at batch 1 (tuned configs in kernels/configs/h100.json)
                add_row("sliced_gemv_cc", "v7 cc ", time_graph(each_linear(sliced_gemv_cc)))
                # the same weights as the decode engine launches them: q/k/v one launch, gate/up one launch
                # (4 launches per layer instead of 7; same bytes, same arithmetic)
                k3, k2 = k.view(1, 1).expand(1, 3).contiguous(), k.view(1, 1).expand(1, 2).contiguous()
                y_qkv = torch.empty(1, sum(SHAPES[n][0] for n in ("q", "k", "v")), device="cuda", dtype=torch.float16)
                y_gu = torch.empty(1, 2 * SHAPES["gate"][0], device="cuda", dtype=torch.float16)
                # int8 activations (x_int8=): x quantized per group before the graph, as the engine's router launch
                # leaves it, or by a quantizer launch before each unit
                x8 = {K: quantize_x_int8(v) for K, v in xin.items()}
                units = ((4096, ("q", "k", "v"), k3, y_qkv), (4096, ("o",), k, outs["o"]),
                         (4096, ("gate", "up"), k2, y_gu), (14336, ("down",), k, outs["down"]))

                def run_fused(int8=False, quantize=False):
                    def run():
                        for L in layers:
                            for K, ws, kk, y in units:
                                if quantize:
                                    quantize_x_int8(xin[K], out=x8[K])
                                w = [L[n]["ours"] for n in ws] if len(ws) > 1 else L[ws[0]]["ours"]
                                sliced_gemv_cc(xin[K], w, kk, out=y, x_int8=x8[K] if int8 else None)
                    return run

                add_row("sliced_gemv_cc_fused", "v7 cc fused qkv/gu", time_graph(run_fused()))
                add_row("sliced_gemv_cc_fused_int8_act", "v10 int8-act fused", time_graph(run_fused(True)))
                add_row("sliced_gemv_cc_fused_int8_act_quantizer", "v10 + quantizer   ",
                        time_graph(run_fused(True, True)))
        if M > 1:
            mixed_vs_uniform(layers, results, M, xin, outs)


def mixed_vs_uniform(layers, results, M, xin, outs, rounds=6):
    """v9 (the kernel dispatch uses for 2..16 fp16 tokens) at a mixed batch's counts against uniform k at their
    largest, each captured once and timed in alternating rounds (ABBA order): both read the same planes, so "mixed
    never slower" is a comparison within noise, which the rows timed one after the other cannot settle."""
    kv = mixed_k(M, 3)
    graphs = {}
    for name, counts in (("mixed", kv), ("uniform", [max(kv)] * M)):
        k = torch.tensor(counts, dtype=torch.int32, device="cuda")

        def run(k=k):
            for L in layers:
                for lin, (N, K) in SHAPES.items():
                    sliced_gemv_mma(xin[K], L[lin]["ours"], k, out=outs[lin])
        graphs[name] = capture_graph(run)
    ms = {name: [] for name in graphs}
    for rnd in range(rounds):
        for name in (("mixed", "uniform") if rnd % 2 == 0 else ("uniform", "mixed")):
            ms[name].append(time_replays(graphs[name]))
    med = {name: statistics.median(v) for name, v in ms.items()}
    results["mixed_vs_uniform"].append(dict(kernel="sliced_gemv_mma", M=M, k=kv, kmax=max(kv), rounds=rounds,
                                            mixed_ms=ms["mixed"], uniform_ms=ms["uniform"],
                                            mixed_median_ms=med["mixed"], uniform_median_ms=med["uniform"],
                                            mixed_over_uniform=med["mixed"] / med["uniform"]))
    log(f"   M={M:2d} v9 alternating {rounds} rounds: mixed {med['mixed']:.3f} ms, uniform k={max(kv)} "
        f"{med['uniform']:.3f} ms ({100 * (med['mixed'] / med['uniform'] - 1):+.2f} %; mixed "
        f"{min(ms['mixed']):.3f}-{max(ms['mixed']):.3f}, uniform {min(ms['uniform']):.3f}-{max(ms['uniform']):.3f})")


def prefill(layers, results, M=2048, n_layers=2):
    log(f"== prefill: {M} tokens, mixed k, {n_layers} layers (7 linears each), CUDA graph")
    Ls = layers[:n_layers]
    xin = {K: torch.randn(M, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    outs = {name: torch.empty(M, N, device="cuda", dtype=torch.float16) for name, (N, K) in SHAPES.items()}
    def run_fp16():
        for L in Ls:
            for name, (N, K) in SHAPES.items():
                torch.mm(xin[K], L[name]["fp16"].t(), out=outs[name])
    t16 = time_graph(run_fp16, reps=5, inner=2)
    flops = sum(2 * M * N * K for N, K in SHAPES.values()) * n_layers
    results["prefill"].append(dict(kernel="cublas_fp16", M=M, k="-", ms=t16, tflops=flops / t16 / 1e9))
    log(f"   cublas fp16 {t16:8.3f} ms  {flops / t16 / 1e9:6.1f} TFLOP/s")
    for label, kv in [("mixed", mixed_k(M, 4)), ("1", [1] * M), ("2", [2] * M), ("3", [3] * M), ("4", [4] * M)]:
        k = torch.tensor(kv, dtype=torch.int32, device="cuda")
        def run_ours():
            for L in Ls:
                for name, (N, K) in SHAPES.items():
                    sliced_gemm(xin[K], L[name]["ours"], k, out=outs[name])
        t = time_graph(run_ours, reps=5, inner=2)
        # per slice-token: a token at k slices counts k times (sum of k_t slice-tokens against M tokens of cuBLAS)
        mk = sum(kv) / M
        results["prefill"].append(dict(kernel="sliced_gemm", M=M, k=label, mean_k=mk, ms=t, tflops=flops / t / 1e9,
                                       vs_cublas=t16 / t, vs_cublas_per_slice_token=mk * t16 / t))
        log(f"   sliced k={label:<6s} {t:8.3f} ms  {flops / t / 1e9:6.1f} TFLOP/s  {100 * t16 / t:5.1f} % of cuBLAS, "
            f"{100 * mk * t16 / t:5.1f} % per slice-token (mean k {mk:.2f})")


def tune_mma(layer, out_path, batches=(2, 4, 8, 16)):
    """Sweep v9 (sliced_gemv_mma) configs per shape and batch bucket: the fastest by the sum of its times at uniform
    k = 2 and k = 4 (a mixed batch costs what its largest k costs). Updates the ``sliced_gemv_mma`` keys of out_path."""
    from mobiquant.kernels.tuning import key

    table = json.loads(Path(out_path).read_text()) if Path(out_path).exists() else {}
    for name, (N, K) in SHAPES.items():
        if name in ("v", "up", "o"):  # same shapes as k, gate, q
            continue
        p = layer[name]["ours"]
        for M in batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            y = torch.empty(M, N, device="cuda", dtype=torch.float16)
            best = None
            for bn, nw in ((32, 2), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8)):
                for sk in (1, 2, 4, 8, 16):
                    if sk > K // GROUP or (N // bn) * sk > 4096 or (sk == 1 and N // bn < 66):
                        continue
                    cfg = dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=nw, PF=1, PDL=1)
                    us = 0.0
                    for kk in (2, 4):
                        k = torch.full((M,), kk, dtype=torch.int32, device="cuda")
                        us += 1e3 * time_graph(lambda: sliced_gemv_mma(x, p, k, out=y, config=cfg), reps=5, inner=20)
                    if best is None or us < best[0]:
                        best = (us, cfg)
            table[key("sliced_gemv_mma", M, N, K)] = best[1]
            log(f"   mma {name} M={M}: {best[1]} k2 + k4 {best[0]:.1f} us")
    Path(out_path).write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    log(f"wrote {out_path}")


def tune(layer, out_path, batches=(1, 4, 16)):
    """Sweep decode configs per shape and batch bucket (uniform k=2 and mixed), keep the fastest; prefill too."""
    from mobiquant.kernels.sliced_gemm import _autotune_configs as gemm_cfgs
    from mobiquant.kernels.sliced_gemv import _autotune_configs as gemv_cfgs
    from mobiquant.kernels.tuning import key

    table = {}
    for name, (N, K) in SHAPES.items():
        if name in ("v", "up"):
            continue
        p = layer[name]["ours"]
        for M in batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            y = torch.empty(M, N, device="cuda", dtype=torch.float16)
            k = torch.tensor([2] * M, dtype=torch.int32, device="cuda")
            best = None
            for cfg in gemv_cfgs():
                if cfg["SPLIT_K"] * cfg["GPI"] > K // GROUP:
                    continue
                try:
                    ms = time_graph(lambda: sliced_gemv(x, p, k, out=y, config=cfg), reps=5, inner=20)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    log(f"   skip {cfg}: {type(e).__name__}")
                    continue
                log(f"      {name} M={M} {cfg}: {ms * 1e3:.1f} us")
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            table[key("sliced_gemv", M, N, K)] = best[1]
            log(f"   gemv {name} M={M}: {best[1]} {best[0] * 1e3:.1f} us")
    Mp = 2048
    for name, (N, K) in SHAPES.items():
        if name in ("v", "up"):
            continue
        p = layer[name]["ours"]
        x = torch.randn(Mp, K, device="cuda", dtype=torch.float16)
        y = torch.empty(Mp, N, device="cuda", dtype=torch.float16)
        k = torch.tensor(mixed_k(Mp), dtype=torch.int32, device="cuda")
        best = None
        for cfg in gemm_cfgs():
            try:
                ms = time_graph(lambda: sliced_gemm(x, p, k, out=y, config=cfg), reps=3, inner=3)
            except Exception as e:  # noqa: BLE001
                log(f"   skip {cfg}: {type(e).__name__}")
                continue
            log(f"      {name} M={Mp} {cfg}: {ms:.3f} ms")
            if best is None or ms < best[0]:
                best = (ms, cfg)
        table[key("sliced_gemm", Mp, N, K)] = best[1]
        log(f"   gemm {name} M={Mp}: {best[1]} {best[0]:.3f} ms")
    Path(out_path).write_text(json.dumps(table, indent=1, sort_keys=True))
    log(f"   wrote {out_path}")


def sweep(layer):
    """Decode launch-config sweep on the gate and q shapes at k=2 (and k=1, k=4 for the best), batch 1."""
    import itertools

    for name in ("gate", "q", "down"):
        N, K = SHAPES[name]
        p = layer[name]["ours"]
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        for kk in (1, 2, 4):
            k = torch.tensor([kk], dtype=torch.int32, device="cuda")
            floor_us = (p.nbytes(kk)) / 3.0e12 * 1e6
            for (gpi, st), sk, xs in itertools.product(((1, 1), (0, 2), (0, 3), (0, 4)), (1, 2, 4), (1, 2)):
                bn, nw = 64, 4
                cfg = dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=nw, num_stages=st, GPI=gpi, XS=xs)
                try:
                    us = 1e3 * time_graph(lambda: sliced_gemv(x, p, k, out=y, config=cfg), reps=5, inner=20)
                except Exception as e:  # noqa: BLE001
                    log(f"   {name} k={kk} {cfg}: {type(e).__name__} {e}")
                    continue
                log(f"   {name} k={kk} GPI={gpi} stages={st} XS={xs} SK={sk}: {us:6.1f} us "
                    f"(copy floor {floor_us:5.1f} us, {100 * floor_us / us:4.1f} %)")


def sweep_cc(layer, out_path):
    """v7 (CUDA-core GEMV): correctness on the LLaMA shapes, then per shape and k a launch-config sweep at batch 1
    against v5's tuned config, then a small stack (n_layers) with the best configs. Writes the table as JSON."""
    res = dict(checks=[], shapes=[], stack=[])
    log("== v7 correctness (batch 1 and 4, every k, large-magnitude x)")
    for name in ("q", "k", "gate", "down"):
        p = layer[name]["ours"]
        for M, kv, xs in [(1, [1], 1), (1, [2], 1), (1, [3], 1), (1, [4], 1), (4, [3, 1, 4, 2], 1),
                          (4, [1, 2, 3, 4], 1000.0)]:
            N, K = p.out_features, p.in_features
            x = (torch.randn(M, K, device="cuda") * xs).half()
            k = torch.tensor(kv, dtype=torch.int32, device="cuda")
            y = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
            sliced_gemv_cc(x, p, k, out=y)
            torch.cuda.synchronize()
            ref = sliced_gemv_ref(x.float(), p, k).float()
            err = y.float() - ref
            mx, rel, fin = (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item(), \
                bool(torch.isfinite(y).all())
            ok = fin and mx < 2e-3
            res["checks"].append(dict(shape=name, M=M, k=kv, x_scale=xs, max_rel=mx, norm_rel=rel, ok=ok))
            if not ok:
                log(f"FAIL v7 {name} M={M} k={kv} xs={xs}: max {mx:.2e} norm {rel:.2e} finite {fin}")
    # PDL: a chain of 6 dependent launches (each output is the next input) captured in a graph must equal the same
    # chain run eagerly without PDL, bit for bit (the kernel is deterministic)
    p = layer["q"]["ours"]
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=8, num_warps=4, num_stages=1, PF=1)
    kq = torch.tensor([2], dtype=torch.int32, device="cuda")
    bufs = [torch.randn(1, 4096, device="cuda").half()] + [torch.empty(1, 4096, device="cuda").half() for _ in range(6)]
    def chain(c):
        for i in range(6):
            sliced_gemv_cc(bufs[i], p, kq, out=bufs[i + 1], config=c)
    chain(cfg)
    ref_chain = bufs[-1].clone()
    pcfg = dict(cfg, PDL=1)
    chain(pcfg)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(pcfg)
    for b in bufs[1:]:
        b.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    same = torch.equal(bufs[-1], ref_chain)
    res["checks"].append(dict(shape="q chain x6, PDL in a graph", M=1, k=[2], x_scale=1, max_rel=0.0 if same else 1.0,
                              norm_rel=0.0, ok=same))
    log(f"   PDL chain of 6 in a CUDA graph bitwise equal to the eager chain: {same}")
    nf = sum(not c["ok"] for c in res["checks"])
    log(f"   {len(res['checks'])} checks, {nf} failed, worst max-rel {max(c['max_rel'] for c in res['checks']):.2e}")
    cfgs = [dict(BLOCK_N=bn, GPI=1, SPLIT_K=sk, num_warps=nw, num_stages=1, PF=1, maxnreg=mr)
            for (bn, nw, mr, sks) in ((128, 4, 0, (4, 8, 16)), (128, 4, 80, (4, 8, 16)), (64, 2, 0, (8, 16)),
                                      (64, 2, 64, (8, 16)))
            for sk in sks]
    best = {}
    log("== v7 sweep, batch 1 (us per linear; copy floor at 3.0 TB/s)")
    for name in ("q", "k", "gate", "down"):
        N, K = SHAPES[name]
        p = layer[name]["ours"]
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        tot = {}
        for kk in (1, 2, 4):
            k = torch.tensor([kk], dtype=torch.int32, device="cuda")
            floor_us = p.nbytes(kk) / 3.0e12 * 1e6
            v5 = 1e3 * time_graph(lambda: sliced_gemv(x, p, k, out=y), reps=5, inner=20)
            row = dict(shape=name, k=kk, floor_us=floor_us, v5_us=v5, v7={})
            for i, cfg in enumerate(cfgs):
                if cfg["SPLIT_K"] * cfg["GPI"] > K // GROUP:
                    continue
                try:
                    us = 1e3 * time_graph(lambda: sliced_gemv_cc(x, p, k, out=y, config=cfg), reps=5, inner=20)
                except Exception as e:  # noqa: BLE001
                    log(f"   skip {cfg}: {type(e).__name__} {e}")
                    continue
                row["v7"][i] = us
                tot[i] = tot.get(i, 0.0) + us
            bi = min(row["v7"], key=row["v7"].get)
            log(f"   {name:5s} k={kk} floor {floor_us:6.1f}  v5 {v5:6.1f}  v7 best {row['v7'][bi]:6.1f} "
                f"({100 * floor_us / row['v7'][bi]:4.1f} % of floor) {cfgs[bi]}")
            res["shapes"].append(row)
        bi = min(tot, key=tot.get)
        best[name] = cfgs[bi]
        log(f"   {name}: best over k=1,2,4: {cfgs[bi]}  " + "  ".join(
            f"{i}:{t:.1f}" for i, t in sorted(tot.items(), key=lambda a: a[1])[:5]))
    best["v"], best["up"], best["o"] = best["k"], best["gate"], best["q"]
    res["best"] = {n: best[n] for n in SHAPES}
    log(f"== stack of {len(_STACK)} layers, batch 1, CUDA graph")
    for M in (1,):
        xin = {K: torch.randn(M, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
        outs = {name: torch.empty(M, N, device="cuda", dtype=torch.float16) for name, (N, K) in SHAPES.items()}
        for kk in (1, 2, 4):
            k = torch.full((M,), kk, dtype=torch.int32, device="cuda")
            def r5():
                for L in _STACK:
                    for name in SHAPES:
                        sliced_gemv(xin[SHAPES[name][1]], L[name]["ours"], k, out=outs[name])
            def r7():
                for L in _STACK:
                    for name in SHAPES:
                        sliced_gemv_cc(xin[SHAPES[name][1]], L[name]["ours"], k, out=outs[name], config=best[name])
            def r7p():
                for L in _STACK:
                    for name in SHAPES:
                        sliced_gemv_cc(xin[SHAPES[name][1]], L[name]["ours"], k, out=outs[name],
                                       config=dict(best[name], PDL=1))
            t5, t7, t7p = time_graph(r5), time_graph(r7), time_graph(r7p)
            y7 = outs["down"].clone()
            r5()
            torch.cuda.synchronize()
            same = (y7 - outs["down"]).abs().max().item() / outs["down"].abs().max().item()
            b = stack_bytes("ours", kk) * len(_STACK)
            res["stack"].append(dict(M=M, k=kk, v5_ms=t5, v7_ms=t7, v7_pdl_ms=t7p, bytes=b, v7_vs_v5_maxrel=same))
            log(f"   M={M} k={kk}: v5 {t5:7.3f} ms  v7 {t7:7.3f} ms  v7+PDL {t7p:7.3f} ms  (copy floor at 3.0 TB/s "
                f"{b / 3e12 * 1e3:6.3f} ms; last down output v7+PDL vs v5 max rel {same:.1e})")
    Path(out_path).write_text(json.dumps(res, indent=1))
    log(f"wrote {out_path}")


_STACK: list = []


def profile_cc():
    """v7: one gate-shaped launch at k=1 and k=4 (batch 1), after a warm-up, for ncu."""
    W = torch.randn(14336, 4096, device="cuda", dtype=torch.float16) * 0.02
    p = quantize_layer(W)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=4, num_warps=4, num_stages=1, PF=1)
    for kk in (1, 4, 1, 4):
        k = torch.tensor([kk], dtype=torch.int32, device="cuda")
        sliced_gemv_cc(x, p, k, config=cfg)
    torch.cuda.synchronize()


def profile_one():
    """One gate-shaped launch per k (batch 1), for `ncu --metrics smsp__sass_thread_inst_executed.sum ...`."""
    W = torch.randn(14336, 4096, device="cuda", dtype=torch.float16) * 0.02
    p = quantize_layer(W)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    for kk in (1, 2, 3, 4):
        k = torch.tensor([kk], dtype=torch.int32, device="cuda")
        sliced_gemv(x, p, k)
    torch.cuda.synchronize()
    for kk in (1, 2, 3, 4):
        k = torch.tensor([kk], dtype=torch.int32, device="cuda")
        torch.cuda.nvtx.range_push(f"k{kk}")
        sliced_gemv(x, p, k)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()


def dump_asm(out_dir):
    """PTX and SASS of the decode kernel at its default config (one file each), for instruction counting."""
    from mobiquant.kernels.sliced_gemv import _sliced_gemv_kernel  # noqa: F401

    W = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) * 0.02
    p = quantize_layer(W)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    k = torch.tensor([2], dtype=torch.int32, device="cuda")
    sliced_gemv(x, p, k)
    from mobiquant.kernels import sliced_gemv as mod

    kern = mod._sliced_gemv_kernel
    for dev_cache in kern.device_caches.values():
        for i, ck in enumerate(dev_cache[0].values()):
            for ext in ("ptx", "ttgir", "sass"):
                try:
                    Path(out_dir, f"gemv_{i}.{ext}").write_text(ck.asm[ext])
                except Exception as e:  # noqa: BLE001
                    log(f"no {ext}: {e}")
            log(f"kernel {i}: regs {getattr(ck, 'n_regs', '?')} spills {getattr(ck, 'n_spills', '?')} "
                f"shared {ck.metadata.shared}")


def sweep_multi(layers, out_path):
    """q/k/v and gate/up of `layers` layers (one token, fp16) as separate v7 launches (tuned configs) against one
    launch per group (sliced_gemv_cc with a list of weights) at several SPLIT_K, each chain in one CUDA graph."""
    res = []
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    for group, names in (("qkv", ("q", "k", "v")), ("gu", ("gate", "up"))):
        N = sum(SHAPES[n][0] for n in names)
        outs = [torch.empty(1, SHAPES[n][0], device="cuda", dtype=torch.float16) for n in names]
        y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        for kv in (1, 2, 4):
            k1 = torch.full((1,), kv, dtype=torch.int32, device="cuda")
            kS = torch.full((1, len(names)), kv, dtype=torch.int32, device="cuda")
            ref = torch.cat([sliced_gemv_cc(x, layers[0][n]["ours"], k1) for n in names], dim=1)

            def separate():
                for L in layers:
                    for n, o in zip(names, outs):
                        sliced_gemv_cc(x, L[n]["ours"], k1, out=o)

            row = dict(group=group, k=kv, layers=len(layers), separate_ms=time_graph(separate))
            for sk in (2, 4, 8, 16):
                cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=sk, num_warps=4, num_stages=1, PF=1, PDL=1)
                one = sliced_gemv_cc(x, [layers[0][n]["ours"] for n in names], kS, config=cfg)
                err = ((one.float() - ref.float()).norm() / ref.float().norm()).item()

                def multi():
                    for L in layers:
                        sliced_gemv_cc(x, [L[n]["ours"] for n in names], kS, out=y, config=cfg)

                row[f"one_launch_split{sk}_ms"] = time_graph(multi)
                row[f"one_launch_split{sk}_rel_err_vs_separate"] = err
            res.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                              date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                                                  timespec="seconds"), rows=res), indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-mma", action="store_true", help="v9 configs per shape and batch into --out")
    ap.add_argument("--profile-one", action="store_true")
    ap.add_argument("--profile-cc", action="store_true")
    ap.add_argument("--no-int4", action="store_true")
    ap.add_argument("--dump-asm", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-cc", action="store_true", help="v7 correctness + config sweep + small stack")
    ap.add_argument("--sweep-multi", action="store_true", help="v7: q/k/v, gate/up in one launch vs separate")
    ap.add_argument("--out", default="benchmarks/results/kernels_h100.json")
    ap.add_argument("--batches", default="1,4,8,16")
    a = ap.parse_args()
    if a.profile_one:
        return profile_one()
    if a.profile_cc:
        return profile_cc()
    if a.dump_asm:
        return dump_asm(a.dump_asm)
    torch.manual_seed(0)
    import triton

    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   cuda=torch.version.cuda, python=platform.python_version(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   layers=a.layers, group_size=GROUP, slice_bits=BITS, checks=[], decode=[], mixed_vs_uniform=[],
                   prefill=[])
    log(f"{results['gpu']}  torch {results['torch']}  triton {results['triton']}  {results['date']}")
    bw = copy_bandwidth()
    results["copy_bw_GBps"] = bw / 1e9
    log(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")
    n = 1 if (a.tune or a.tune_mma or a.sweep) else a.layers
    slim = a.tune or a.tune_mma or a.sweep or a.sweep_cc or a.sweep_multi
    layers = []
    for i in range(n):
        L = {}
        for name, (N, K) in SHAPES.items():
            W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
            L[name] = {"ours": quantize_layer(W)}
            if not slim:
                L[name]["fp16"] = W
                if not a.no_int4:
                    try:
                        L[name]["int4"] = int4_tinygemm(W)
                    except Exception as e:  # noqa: BLE001
                        if i == 0 and name == "q":
                            log(f"tinygemm unavailable: {type(e).__name__}: {e}")
            else:
                del W
        layers.append(L)
    log(f"built {n} layers")
    if a.tune:
        return tune(layers[0], a.out)
    if a.tune_mma:
        return tune_mma(layers[0], a.out)
    if a.sweep:
        return sweep(layers[0])
    if a.sweep_multi:
        return sweep_multi(layers, a.out)
    if a.sweep_cc:
        _STACK.extend(layers)
        return sweep_cc(layers[0], a.out)
    ok = run_checks(layers, results)
    if not ok:
        log("correctness checks failed: timings below are of a wrong kernel")
    results["checks_ok"] = ok
    decode_stack(layers, results, [int(b) for b in a.batches.split(",")], bw, quick=a.quick)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))  # kept if prefill does not finish
    prefill(layers, results)
    bw_ms = {k: stack_bytes("ours", k) * a.layers / bw * 1e3 for k in (1, 2, 3, 4)}  # whole stack at copy speed
    results["copy_floor_ms"] = bw_ms
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    log(f"wrote {a.out}")
    log("\nkernel           M  k                 ms   %copyBW")
    for r in results["decode"]:
        log(f"{r['kernel']:<16s} {r['M']:2d} {str(r['k'])[:14]:<14s} {r['ms']:7.3f} {r['pct_copy_bw']:6.1f}")
    for r in results["mixed_vs_uniform"]:
        log(f"v9 M={r['M']:2d} mixed {r['mixed_median_ms']:.3f} vs uniform k={r['kmax']} "
            f"{r['uniform_median_ms']:.3f} ms (alternating, {r['rounds']} rounds): x{r['mixed_over_uniform']:.4f}")
    for r in results["prefill"]:
        log(f"prefill {r['kernel']:<15s} k={r['k']:<6s} {r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s")


if __name__ == "__main__":
    sys.exit(main())
