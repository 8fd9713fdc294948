# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
"""A/B on the H100: v9 as committed (two mma chains per plane, chunks 2t and 2t + 1, added at the end) against one
chain of 8 mma per plane and block (no adds, twice the dependent chain), 32-layer stacks at 4 and 16 tokens.
Runs on commit e25e8eb (two chains; the one-chain variant is derived from it by text substitution, and became the
kernel in the next commit, where the substitutions no longer apply).

    OUT=/tmp python3 -P benchmarks/experiments/ab_v9_chain.py     # writes $OUT/v9_chain_ab_h100.json
"""

import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

base = importlib.import_module("mobiquant.kernels.sliced_gemv_mma")  # the module (the package exports the function)

spec = importlib.util.spec_from_file_location("kbench", Path(__file__).parents[1] / "kernels.py")
KB = importlib.util.module_from_spec(spec)
spec.loader.exec_module(KB)
OUT = Path(os.environ.get("OUT", "/tmp"))


def one_chain_module():
    src = Path(base.__file__).read_text()
    for old, new in [
        ('(("d", ("qa", "qb"), 0), ("e", ("qc", "qd"), 8))', '(("d", ("qa", "qb"), 0), ("d", ("qc", "qd"), 8))'),
        ('f"add.f32 ${2 * o}, d{b}{par}, e{b}{par};"', 'f"mov.f32 ${2 * o}, d{b}{par};"'),
        ('f"add.f32 ${2 * o + 1}, d{b}{2 + par}, e{b}{2 + par};"', 'f"mov.f32 ${2 * o + 1}, d{b}{2 + par};"'),
        ('(("d", 0), ("e", 8))', '(("d", 0), ("d", 8))'),
        ('f"add.f32 ${4 * b + i}, d{b}{i}, e{b}{i};"', 'f"mov.f32 ${4 * b + i}, d{b}{i};"'),
    ]:
        assert old in src, old
        src = src.replace(old, new)
    path = Path(base.__file__).with_name("_mma_one_chain.py")
    path.write_text(src)
    return importlib.import_module("mobiquant.kernels._mma_one_chain")


def main():
    v1 = one_chain_module()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC"),
               rows=[])
    torch.manual_seed(0)
    layers = []
    for _ in range(32):
        L = {}
        for n, (N, K) in KB.SHAPES.items():
            q = torch.randint(-(2**31), 2**31 - 1, (4, N, K // 16), dtype=torch.int32, device="cuda")
            s = (torch.rand(K // 128, N, device="cuda") * 0.01 + 0.001).half()
            z = (torch.rand(K // 128, N, device="cuda") * 3).half()
            L[n] = base.PackedSlices(q, s, z, 128)
        layers.append(L)
    p = layers[0]["gate"]
    for M in (4, 16):  # same results within fp32 summation order
        x = torch.randn(M, 4096, device="cuda").half()
        k = torch.randint(1, 5, (M,), dtype=torch.int32, device="cuda")
        a, b = base.sliced_gemv_mma(x, p, k).float(), v1.sliced_gemv_mma(x, p, k).float()
        print("M", M, "max |a - b| / max |a|", ((a - b).abs().max() / a.abs().max()).item(), flush=True)
    for M in (4, 16):
        xin = {K: torch.randn(M, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
        outs = {n: torch.empty(M, N, device="cuda", dtype=torch.float16) for n, (N, K) in KB.SHAPES.items()}
        for kv in ([2] * M, [4] * M, KB.mixed_k(M, 3)):
            k = torch.tensor(kv, dtype=torch.int32, device="cuda")
            t = {}
            for rep in range(2):
                for name, mod in (("two chains", base), ("one chain", v1)):
                    def run():
                        for L in layers:
                            for n, (N, K) in KB.SHAPES.items():
                                mod.sliced_gemv_mma(xin[K], L[n], k, out=outs[n])
                    t.setdefault(name, []).append(KB.time_graph(run))
            label = str(kv[0]) if len(set(kv)) == 1 else "mixed"
            for name, v in t.items():
                res["rows"].append(dict(variant=name, M=M, k=label, ms=min(v), runs=v))
                print(f"M={M:2d} k={label:6s} {name:10s} {min(v):7.3f} ms  {v}", flush=True)
    (OUT / "v9_chain_ab_h100.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
