# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""LLaMA-3-8B's lm_head (128256 x 4096) at batch 1: cuBLAS fp16 against the batch-1 sliced kernel at k = 1..4,
with a launch-config sweep, fp16 and int8 activations (the int8 rows include the quantizer launch before them).

Why: the decode engine's ``head_slices`` option runs lm_head through ``sliced_gemv_cc`` at a fixed count; the head
is 1.05 GB in fp16, 0.37 ms of a 1.8 ms step at budget 2. This finds its config (an entry of
kernels/configs/h100.json) and what it costs at each count.

    PYTHONPATH=<scratch with mobiquant/kernels> python3 -P benchmarks/experiments/head_gemv.py

Prints a table (ms per launch, % of copy bandwidth, GB read) and writes $OUT/head_gemv_h100.json (default
benchmarks/results/). Each config is checked against the torch reference first (NaN-poisoned output).
"""

import datetime
import importlib.util
import itertools
import json
import os
import platform
from pathlib import Path

import torch
from mobiquant.kernels import dequantize_x_int8, quantize_x_int8
from mobiquant.kernels.sliced_gemv import sliced_gemv_ref
from mobiquant.kernels.sliced_gemv_cc import sliced_gemv_cc
from mobiquant.kernels.tuning import lookup

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB  # benchmarks/kernels.py: quantize_layer, time_graph, copy_bandwidth

N, K = 128256, 4096
OUT = Path(os.environ.get("OUT", Path(__file__).parents[1] / "results"))


def main():
    import triton

    torch.manual_seed(0)
    W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
    P = KB.quantize_layer(W)
    bw = KB.copy_bandwidth()
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    x8 = quantize_x_int8(x)
    y = torch.empty(1, N, device="cuda", dtype=torch.float16)
    rows = []

    def add(kernel, k, cfg, ms, nbytes):
        rows.append(dict(kernel=kernel, k=k, config=cfg, ms=ms, gb=nbytes / 1e9,
                         pct_copy_bw=100 * nbytes / (ms * 1e-3) / bw))
        print(f"{kernel:>14s} k={k} {ms:7.4f} ms {rows[-1]['pct_copy_bw']:5.1f} %  {cfg}", flush=True)

    add("cublas_fp16", "-", None, KB.time_graph(lambda: torch.mm(x, W.t(), out=y)), 2 * N * K)
    base = dict(GPI=1, PF=1, PDL=1, num_stages=1)
    grid = [dict(base, BLOCK_N=bn, SPLIT_K=sk, num_warps=nw, MMA=mma)
            for bn, sk, nw, mma in itertools.product((64, 128, 256), (1, 2, 4), (4, 8), (0, 15)) if bn >= 16 * nw]
    tuned = lookup("sliced_gemv_cc", 1, N, K)
    errors, best = [], {}
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                shape=[N, K], group=KB.GROUP, slices=list(KB.BITS), copy_bw_gb_s=bw / 1e9)

    def save():  # after each k: a run cut short keeps what it measured
        for r in rows:
            key = f"{r['kernel']} k={r['k']}"
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "head_gemv_h100.json").write_text(json.dumps(dict(meta=meta, best=best, rows=rows, errors=errors),
                                                            indent=1) + "\n")

    for k in (1, 2, 3, 4):
        kk = torch.full((1,), k, dtype=torch.int32, device="cuda")
        ref = sliced_gemv_ref(x.float(), P, kk).float()
        ref8 = sliced_gemv_ref(dequantize_x_int8(*x8), P, kk).float()
        for a8 in (False, True):
            for cfg in grid + ([dict(tuned, _tuned=1)] if tuned else []):
                cfg_run = {c: v for c, v in cfg.items() if not c.startswith("_")}
                if a8:  # the int8 path is on the tensor cores whatever MMA says: one of the two
                    if cfg_run.get("MMA") == 0 or cfg_run["BLOCK_N"] % (16 * cfg_run["num_warps"]):
                        continue
                    cfg_run = dict(cfg_run, RING=15, REARLY=1)
                kw = dict(x_int8=x8) if a8 else {}
                try:
                    y.fill_(float("nan"))
                    sliced_gemv_cc(x, P, kk, out=y, config=cfg_run, **kw)
                    torch.cuda.synchronize()
                except Exception as e:  # a config the kernel refuses: report, go on
                    errors.append(dict(k=k, a8=a8, config=cfg_run, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                r = ref8 if a8 else ref
                err = ((y.float() - r).abs().max() / r.abs().max()).item()
                if not (torch.isfinite(y).all() and err < 2e-3):
                    errors.append(dict(k=k, a8=a8, config=cfg_run, max_rel=err))
                    continue

                def run():
                    if a8:
                        quantize_x_int8(x, out=x8)
                    sliced_gemv_cc(x, P, kk, out=y, config=cfg_run, **kw)

                add("a8+quantizer" if a8 else "fp16", k, cfg_run, KB.time_graph(run), P.nbytes(k))
        save()
    print("\n| case | ms | % copy BW | config |\n|---|---|---|---|")
    for key, r in best.items():
        print(f"| {key} | {r['ms']:.4f} | {r['pct_copy_bw']:.1f} | {r['config']} |")
    print("errors:", errors)


if __name__ == "__main__":
    main()
