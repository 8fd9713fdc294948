# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
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
spec = importlib.util.spec_from_file_location("kbench", Path(__file__).parents[1] / "kernels.py")
KB = importlib.util.module_from_spec(spec)
spec.loader.exec_module(KB)
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
    torch.manual_seed(0)
    layers = [{n: KB.quantize_layer(torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02)
               for n, (N, K) in KB.SHAPES.items()} for _ in range(32)]
    for n in ("q", "gate", "down"):
        for kk in (1, 2, 3, 4):
            mx, rel, fin = KB.check(layers[0][n], 1, [kk], torch.float16, fn=v1.sliced_gemv_cc)
            res["checks"].append(dict(shape=n, k=kk, max_rel=mx, norm_rel=rel, finite=fin))
            print(f"check one-chain {n:5s} k={kk} max {mx:.2e} finite {fin}", flush=True)
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
            for name, mod in (("two chains", base), ("one chain", v1)):
                def run():
                    for L in layers:
                        mod.sliced_gemv_cc(xin[4096], [L[n] for n in ("q", "k", "v")], k3, out=y_qkv)
                        mod.sliced_gemv_cc(xin[4096], L["o"], k, out=o)
                        mod.sliced_gemv_cc(xin[4096], [L["gate"], L["up"]], k2, out=y_gu)
                        mod.sliced_gemv_cc(xin[14336], L["down"], k, out=d)
                t.setdefault(name, []).append(KB.time_graph(run))
        for name, v in t.items():
            res["rows"].append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name:10s}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)
    (OUT / "v8_chain_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
