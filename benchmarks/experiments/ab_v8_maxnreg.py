# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
"""A/B on the H100: the batch-1 fused stack (v7 + v8, tuned configs) against the same configs with a register cap
(maxnreg 96: 5 CTAs of 128 threads per SM instead of 4 at 128 registers; 80: 6), to test whether more resident warps
put more loads in flight (the ncu of experiments/ncu_v8_raw.py: long-scoreboard-bound, DRAM 48-58 %).

    OUT=/tmp python3 -P benchmarks/experiments/ab_v8_maxnreg.py      # writes $OUT/v8_maxnreg_ab_h100.json
"""

import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from mobiquant.kernels.sliced_gemv_cc import sliced_gemv_cc
from mobiquant.kernels.tuning import lookup

spec = importlib.util.spec_from_file_location("kbench", Path(__file__).parents[1] / "kernels.py")
KB = importlib.util.module_from_spec(spec)
spec.loader.exec_module(KB)
OUT = Path(os.environ.get("OUT", "/tmp"))


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC"),
               rows=[], checks=[])
    torch.manual_seed(0)
    layers = [{n: KB.quantize_layer(torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02)
               for n, (N, K) in KB.SHAPES.items()} for _ in range(32)]
    base = {"qkv": lookup("sliced_gemv_cc", 1, 6144, 4096), "o": lookup("sliced_gemv_cc", 1, 4096, 4096),
            "gu": lookup("sliced_gemv_cc", 1, 28672, 4096), "down": lookup("sliced_gemv_cc", 1, 4096, 14336)}
    variants = {"tuned": base}
    for cap in (96, 80):
        variants[f"maxnreg {cap}"] = {u: dict(c, maxnreg=cap) for u, c in base.items()}
    for name, cfgs in variants.items():
        for kk in (1, 2, 4):
            mx, rel, fin = KB.check(layers[0]["down"], 1, [kk], torch.float16, fn=sliced_gemv_cc, config=cfgs["down"])
            res["checks"].append(dict(variant=name, k=kk, max_rel=mx, finite=fin))
            print(f"check {name:12s} down k={kk} max {mx:.2e} finite {fin}", flush=True)
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
            for name, c in variants.items():
                def run():
                    for L in layers:
                        sliced_gemv_cc(xin[4096], [L[n] for n in ("q", "k", "v")], k3, out=y_qkv, config=c["qkv"])
                        sliced_gemv_cc(xin[4096], L["o"], k, out=o, config=c["o"])
                        sliced_gemv_cc(xin[4096], [L["gate"], L["up"]], k2, out=y_gu, config=c["gu"])
                        sliced_gemv_cc(xin[14336], L["down"], k, out=d, config=c["down"])
                t.setdefault(name, []).append(KB.time_graph(run))
        for name, v in t.items():
            res["rows"].append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name:12s}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)
    (OUT / "v8_maxnreg_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
