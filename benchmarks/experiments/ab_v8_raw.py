# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
"""A/B on the H100: v8 (tensor cores from registers, batch 1) converting each code register with an HFMA2 and summing
x on the CUDA cores (kernel of commit 9ff6611, as "ref") against the raw registers of v9 (one LOP3 each: o_j + Q_k)
with Σ o x and Σ x from one more mma chain ("new": that commit plus experiments/v8_raw.patch): the fused 32-layer
decode stack at k = 1..4. Result: 10-19 % fewer SASS instructions per weight, but 1.5-17 % slower (not kept;
KERNEL_NOTES.md, "Ninth session").

    git show 9ff6611:kernels/sliced_gemv_cc.py > <pkg>/kernels/_cc_ref.py; git apply experiments/v8_raw.patch
    OUT=/tmp python3 -P benchmarks/experiments/ab_v8_raw.py      # writes $OUT/v8_raw_ab_h100.json
"""

import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("kbench", Path(__file__).parents[1] / "kernels.py")
KB = importlib.util.module_from_spec(spec)
spec.loader.exec_module(KB)
OUT = Path(os.environ.get("OUT", "/tmp"))
new = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")
ref = importlib.import_module("mobiquant.kernels._cc_ref")


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC"),
               ref=os.environ.get("REF", "?"), rows=[], checks=[])
    torch.manual_seed(0)
    layers = []
    for _ in range(32):
        L = {}
        for n, (N, K) in KB.SHAPES.items():
            W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
            L[n] = KB.quantize_layer(W)
        layers.append(L)
    for n in ("q", "gate", "down"):  # both against the dense reference at every k (tuned configs: v8 where on)
        p = layers[0][n]
        for kk in (1, 2, 3, 4):
            for name, mod in (("ref", ref), ("new", new)):
                mx, rel, fin = KB.check(p, 1, [kk], torch.float16, fn=mod.sliced_gemv_cc)
                res["checks"].append(dict(variant=name, shape=n, k=kk, max_rel=mx, norm_rel=rel, finite=fin))
                print(f"check {name} {n:5s} k={kk} max {mx:.2e} norm {rel:.2e} finite {fin}", flush=True)
    xin = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    o = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    d = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    y_qkv = torch.empty(1, 6144, device="cuda", dtype=torch.float16)
    y_gu = torch.empty(1, 28672, device="cuda", dtype=torch.float16)
    for kk in (1, 2, 3, 4):
        k = torch.tensor([kk], dtype=torch.int32, device="cuda")
        k3, k2 = k.view(1, 1).expand(1, 3).contiguous(), k.view(1, 1).expand(1, 2).contiguous()
        t = {}
        for rep in range(3):
            for name, mod in (("ref", ref), ("new", new)):
                def run():
                    for L in layers:
                        mod.sliced_gemv_cc(xin[4096], [L[n] for n in ("q", "k", "v")], k3, out=y_qkv)
                        mod.sliced_gemv_cc(xin[4096], L["o"], k, out=o)
                        mod.sliced_gemv_cc(xin[4096], [L["gate"], L["up"]], k2, out=y_gu)
                        mod.sliced_gemv_cc(xin[14336], L["down"], k, out=d)
                t.setdefault(name, []).append(KB.time_graph(run))
        for name, v in t.items():
            res["rows"].append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)
    (OUT / "v8_raw_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
