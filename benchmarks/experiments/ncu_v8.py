"""ncu of the batch-1 kernel with and without the tensor-core path (run under ncu, see kernels_v8_ncu_h100.json)."""

import importlib

import torch
from mobiquant.kernels.layout import PackedSlices
from mobiquant.kernels.tuning import lookup

cc = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")


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
cfg_gu = lookup("sliced_gemv_cc", 1, 28672, 4096)
cfg_dn = lookup("sliced_gemv_cc", 1, 4096, 14336)
runs = []
for kk in (2, 4):
    k2 = torch.full((1, 2), kk, dtype=torch.int32, device="cuda")
    k1 = torch.tensor([kk], dtype=torch.int32, device="cuda")
    for name, mma in (("v8", 15), ("v7", 0)):
        runs.append(
            (
                f"gu k={kk} {name}",
                lambda k2=k2, mma=mma: cc.sliced_gemv_cc(x4, gu, k2, config=dict(cfg_gu, MMA=mma, PDL=0)),
            )
        )
        runs.append(
            (
                f"down k={kk} {name}",
                lambda k1=k1, mma=mma: cc.sliced_gemv_cc(
                    x14,
                    down,
                    k1,
                    config=dict(cfg_dn, MMA=mma, PDL=0)
                    if mma
                    else dict(BLOCK_N=64, GPI=1, SPLIT_K=16, num_warps=2, num_stages=1, PF=1, PDL=0),
                ),
            )
        )
for _n, f in runs:  # compile + warm
    f()
    f()
torch.cuda.synchronize()
print("ORDER", [n for n, _ in runs], flush=True)
torch.cuda.cudart().cudaProfilerStart()
for _n, f in runs:
    f()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
