"""A/B on the H100: v8 (batch-1 tensor-core path of sliced_gemv_cc) as committed, two mma chains of 4 per group
(chunks 2t and 2t + 1, added at the end), against one chain of 8 (what v9 measured faster at 4-16 tokens): the fused
32-layer decode stack at k = 1..4, alternating, 3 rounds. The variant is derived from the committed source by text
substitution into mobiquant/kernels/_cc_one_chain.py.

    OUT=/tmp python3 -P benchmarks/experiments/ab_v8_chain.py      # writes $OUT/v8_chain_ab_h100.json
"""

import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

base = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")  # the module (the package exports the function)
spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))


def one_chain_module():
    src = Path(base.__file__).read_text()
    for old, new in [
        ('(("d", ("qa", "qb"), 0), ("e", ("qc", "qd"), 8))', '(("d", ("qa", "qb"), 0), ("d", ("qc", "qd"), 8))'),
        ('L += ["add.f32 d0, d0, e0;", "add.f32 d2, d2, e2;",\n          ', 'L += ['),
    ]:
        assert old in src, old
        src = src.replace(old, new)
    path = Path(base.__file__).with_name("_cc_one_chain.py")
    path.write_text(src)
    return importlib.import_module("mobiquant.kernels._cc_one_chain")


def main():
    v1 = one_chain_module()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC"),
               rows=[], checks=[])
    layers = FS.quantized_layers()
    for n in ("q", "gate", "down"):
        for kk in (1, 2, 3, 4):
            mx, rel, fin = KB.check(layers[0][n], 1, [kk], torch.float16, fn=v1.sliced_gemv_cc)
            res["checks"].append(dict(shape=n, k=kk, max_rel=mx, norm_rel=rel, finite=fin))
            print(f"check one-chain {n:5s} k={kk} max {mx:.2e} finite {fin}", flush=True)
    res["rows"] = FS.time_fused_stack({"two chains": (base.sliced_gemv_cc, None),
                                       "one chain": (v1.sliced_gemv_cc, None)}, layers)
    (OUT / "v8_chain_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
