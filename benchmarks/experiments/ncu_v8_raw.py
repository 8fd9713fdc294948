"""ncu of the batch-1 tensor-core path (v8) against its raw-register variant (experiments/v8_raw.patch): one launch
each of gate/up fused (28672 x 4096) and down (4096 x 14336) at k = 2 and 4, tuned configs, PDL off, serialized.

    patch a copy of kernels/sliced_gemv_cc.py with v8_raw.patch into <pkg>/kernels/_cc_raw.py, then
    ncu --profile-from-start off --clock-control none --kernel-name regex:_sliced_gemv_cc \
        --metrics <those of results/kernels_v8_raw_ncu_h100.json> python3 -P benchmarks/experiments/ncu_v8_raw.py
"""

import importlib

import torch
from mobiquant.kernels.layout import PackedSlices
from mobiquant.kernels.tuning import lookup

ref = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")
raw = importlib.import_module("mobiquant.kernels._cc_raw")


def rpack(N, K, E=4, g=128):
    return PackedSlices(
        torch.randint(-(2**31), 2**31 - 1, (E, N, K // 16), dtype=torch.int32, device="cuda"),
        (torch.rand(K // g, N, device="cuda") * 0.01 + 0.001).half(),
        (torch.rand(K // g, N, device="cuda") * 3).half(),
        g,
    )


gu = [rpack(14336, 4096), rpack(14336, 4096)]
down = rpack(4096, 14336)
x4 = torch.randn(1, 4096, device="cuda").half()
x14 = torch.randn(1, 14336, device="cuda").half()
cfg_gu = dict(lookup("sliced_gemv_cc", 1, 28672, 4096), PDL=0)
cfg_dn = dict(lookup("sliced_gemv_cc", 1, 4096, 14336), PDL=0)
runs = []
for kk in (2, 4):
    k2 = torch.full((1, 2), kk, dtype=torch.int32, device="cuda")
    k1 = torch.tensor([kk], dtype=torch.int32, device="cuda")
    for name, mod in (("v8", ref), ("raw", raw)):
        runs.append((f"gu k={kk} {name}", lambda k2=k2, mod=mod: mod.sliced_gemv_cc(x4, gu, k2, config=cfg_gu)))
        runs.append((f"down k={kk} {name}", lambda k1=k1, mod=mod: mod.sliced_gemv_cc(x14, down, k1, config=cfg_dn)))
for _n, f in runs:  # compile + warm
    f()
    f()
torch.cuda.synchronize()
print("ORDER", [n for n, _ in runs], flush=True)
print("CONFIGS", cfg_gu, cfg_dn, flush=True)
torch.cuda.cudart().cudaProfilerStart()
for _n, f in runs:
    f()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
