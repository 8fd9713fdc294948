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

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))
new = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")
ref = importlib.import_module("mobiquant.kernels._cc_ref")


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC"),
               ref=os.environ.get("REF", "?"), rows=[], checks=[])
    layers = FS.quantized_layers()
    for n in ("q", "gate", "down"):  # both against the dense reference at every k (tuned configs: v8 where on)
        p = layers[0][n]
        for kk in (1, 2, 3, 4):
            for name, mod in (("ref", ref), ("new", new)):
                mx, rel, fin = KB.check(p, 1, [kk], torch.float16, fn=mod.sliced_gemv_cc)
                res["checks"].append(dict(variant=name, shape=n, k=kk, max_rel=mx, norm_rel=rel, finite=fin))
                print(f"check {name} {n:5s} k={kk} max {mx:.2e} norm {rel:.2e} finite {fin}", flush=True)
    res["rows"] = FS.time_fused_stack({"ref": (ref.sliced_gemv_cc, None), "new": (new.sliced_gemv_cc, None)}, layers)
    (OUT / "v8_raw_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
