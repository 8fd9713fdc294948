# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
"""v9 (sliced_gemv_mma) on the H100: checks, a config sweep per shape, then 32-layer stacks at 1 / 4 / 8 / 16 tokens
against v5 (sliced_gemv), v7+v8 (sliced_gemv_cc, fused launches at batch 1) and tinygemm, in one run.

    OUT=/tmp python3 -P benchmarks/experiments/ab_v9.py        # prints tables, writes $OUT/v9_ab_h100.json
"""

import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from mobiquant.kernels.layout import PackedSlices
from mobiquant.kernels.sliced_gemv import sliced_gemv, sliced_gemv_ref
from mobiquant.kernels.sliced_gemv_cc import sliced_gemv_cc
from mobiquant.kernels.sliced_gemv_mma import sliced_gemv_mma

spec = importlib.util.spec_from_file_location("kbench", Path(__file__).parents[1] / "kernels.py")
KB = importlib.util.module_from_spec(spec)
spec.loader.exec_module(KB)
OUT = Path(os.environ.get("OUT", "/tmp"))
LAYERS = int(os.environ.get("LAYERS", "32"))
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:5.0f}s]", *a, flush=True)


def rpack(N, K, E=4, g=128):
    q = torch.randint(-(2**31), 2**31 - 1, (E, N, K // 16), dtype=torch.int32, device="cuda")
    s = (torch.rand(K // g, N, device="cuda") * 0.01 + 0.001).half()
    z = (torch.rand(K // g, N, device="cuda") * 3).half()
    return PackedSlices(q, s, z, g)


def check(p, kv, cfg=None):
    M, K = len(kv), p.in_features
    x = torch.randn(M, K, device="cuda").half()
    k = torch.tensor(kv, dtype=torch.int32, device="cuda")
    y = torch.full((M, p.out_features), float("nan"), device="cuda", dtype=torch.float16)
    sliced_gemv_mma(x, p, k, out=y, config=cfg)
    ref = sliced_gemv_ref(x.float(), p, k).float()
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC",
               time.gmtime()), layers=LAYERS, checks=[], sweep=[], stack=[])
    import triton

    res["triton"] = triton.__version__
    torch.manual_seed(0)
    shapes = {"q": (4096, 4096), "k": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)}
    one = {n: rpack(*s) for n, s in shapes.items()}
    worst = 0.0
    for n, p in one.items():
        for kv in ([1], [2], [4], [3, 1, 4, 2], [2] * 4, [1, 2, 3, 4] * 4, [4, 1, 1, 3, 2, 2, 1, 3, 4]):
            e = check(p, kv)
            worst = max(worst, e)
            res["checks"].append(dict(shape=n, k=kv, max_rel=e))
    log(f"checks: {len(res['checks'])}, worst max-rel {worst:.2e}")
    # config sweep per shape, M = 4 at k = 2 and 4 (one launch, CUDA graph)
    best = {}
    for n, p in one.items():
        N, K = shapes[n]
        for M in (1, 4, 16):
            x = torch.randn(M, K, device="cuda").half()
            y = torch.empty(M, N, device="cuda").half()
            rows = []
            for bn, nw in ((64, 4), (128, 4), (32, 2), (64, 2), (128, 8)):
                for sk in (1, 2, 4, 8, 16):
                    if (N // bn) * sk > 4096 or K // 128 < sk:
                        continue
                    cfg = dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=nw, PF=1, PDL=1)
                    t = []
                    for kk in (2, 4):
                        k = torch.full((M,), kk, dtype=torch.int32, device="cuda")
                        t.append(1e3 * KB.time_graph(lambda: sliced_gemv_mma(x, p, k, out=y, config=cfg), reps=5,
                                                     inner=20))
                    rows.append((t[0] + t[1], cfg, t))
                    res["sweep"].append(dict(shape=n, M=M, cfg=cfg, us_k2=t[0], us_k4=t[1]))
            rows.sort(key=lambda r: r[0])
            best[(n, M)] = rows[0][1]
            log(f"sweep {n:5s} M={M:2d}: best {rows[0][1]} k2 {rows[0][2][0]:.1f} us k4 {rows[0][2][1]:.1f} us; "
                f"default-ish {[r[2] for r in rows if r[1]['BLOCK_N'] == 64 and r[1]['num_warps'] == 4][:1]}")
    res["best"] = {f"{n}:{M}": c for (n, M), c in best.items()}
    Path(OUT / "v9_ab_h100.json").write_text(json.dumps(res, indent=1))
    # stacks
    unit = {"q": "q", "k": "k", "v": "k", "o": "q", "gate": "gate", "up": "gate", "down": "down"}
    layers = [{n: rpack(*KB.SHAPES[n]) for n in KB.SHAPES} for _ in range(LAYERS)]
    int4 = []
    for i in range(LAYERS):
        L = {}
        for n, (N, K) in KB.SHAPES.items():
            L[n] = KB.int4_tinygemm(torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02)
        int4.append(L)
    bw = KB.copy_bandwidth()
    res["copy_bw_GBps"] = bw / 1e9
    log(f"built {LAYERS} layers; copy bandwidth {bw / 1e9:.0f} GB/s")

    def row(kernel, M, label, ms, kmax):
        b = KB.stack_bytes("ours", kmax) * LAYERS if kmax else KB.stack_bytes("int4") * LAYERS
        res["stack"].append(dict(kernel=kernel, M=M, k=label, ms=ms, pct_copy_bw=100 * b / (ms * 1e-3) / bw))
        log(f"  M={M:2d} {kernel:18s} k={label:<10s} {ms:7.3f} ms {res['stack'][-1]['pct_copy_bw']:5.1f} %")

    for M in (1, 4, 8, 16):
        xin = {K: torch.randn(M, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
        outs = {n: torch.empty(M, N, device="cuda", dtype=torch.float16) for n, (N, K) in KB.SHAPES.items()}
        xb = {K: v.bfloat16() for K, v in xin.items()}

        def run_int4():
            for L in int4:
                for n, (N, K) in KB.SHAPES.items():
                    torch._weight_int4pack_mm(xb[K], L[n][0], 128, L[n][1])
        row("tinygemm_int4", M, "-", KB.time_graph(run_int4), 0)
        mb = min((b for b in (1, 4, 16) if b >= M), default=16)
        for kv in ([1] * M, [2] * M, [3] * M, [4] * M) + (() if M == 1 else (KB.mixed_k(M, 3),)):
            k = torch.tensor(kv, dtype=torch.int32, device="cuda")
            label = str(kv[0]) if len(set(kv)) == 1 else "mixed"

            def run9():
                for L in layers:
                    for n, (N, K) in KB.SHAPES.items():
                        sliced_gemv_mma(xin[K], L[n], k, out=outs[n], config=best[(unit[n], mb)])
            row("v9 mma", M, label, KB.time_graph(run9), max(kv))
            if M > 1 and kv[0] in (2, 4) or label == "mixed":
                def run5():
                    for L in layers:
                        for n, (N, K) in KB.SHAPES.items():
                            sliced_gemv(xin[K], L[n], k, out=outs[n])
                row("v5", M, label, KB.time_graph(run5), max(kv))
            if M == 1:
                k3, k2 = k.view(1, 1).expand(1, 3).contiguous(), k.view(1, 1).expand(1, 2).contiguous()
                y_qkv = torch.empty(1, 6144, device="cuda", dtype=torch.float16)
                y_gu = torch.empty(1, 28672, device="cuda", dtype=torch.float16)

                def run_fused():
                    for L in layers:
                        sliced_gemv_cc(xin[4096], [L[n] for n in ("q", "k", "v")], k3, out=y_qkv)
                        sliced_gemv_cc(xin[4096], L["o"], k, out=outs["o"])
                        sliced_gemv_cc(xin[4096], [L["gate"], L["up"]], k2, out=y_gu)
                        sliced_gemv_cc(xin[14336], L["down"], k, out=outs["down"])
                row("v7+v8 cc fused", M, label, KB.time_graph(run_fused), max(kv))

                def run_cc():
                    for L in layers:
                        for n, (N, K) in KB.SHAPES.items():
                            sliced_gemv_cc(xin[K], L[n], k, out=outs[n])
                row("v7+v8 cc 7 launches", M, label, KB.time_graph(run_cc), max(kv))
        Path(OUT / "v9_ab_h100.json").write_text(json.dumps(res, indent=1))
    log("done")


if __name__ == "__main__":
    main()
