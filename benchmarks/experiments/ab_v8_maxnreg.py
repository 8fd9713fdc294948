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

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC"),
               rows=[], checks=[])
    layers = FS.quantized_layers()
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
    res["rows"] = FS.time_fused_stack({n: (sliced_gemv_cc, c) for n, c in variants.items()}, layers)
    (OUT / "v8_maxnreg_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
