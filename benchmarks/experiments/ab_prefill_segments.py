# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
"""Prefill A/B on the H100: committed sliced_gemm (straddling tiles per slice) vs segment-aligned tiles, + configs."""

import importlib
import json
import os
import runpy
import time
from pathlib import Path

import torch
from mobiquant.kernels.layout import PackedSlices
from mobiquant.kernels.sliced_gemv import sliced_gemv_ref

OLD = importlib.import_module("mobiquant.kernels.gemm_old")  # sliced_gemm.py at ef5b516 (its _tile as _tile_old)
NEW = importlib.import_module("mobiquant.kernels.sliced_gemm")
OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:5.0f}s]", *a, flush=True)


torch.manual_seed(0)
SHAPES = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}


def rpack(N, K, E=4, g=128):
    q = torch.randint(-(2**31), 2**31 - 1, (E, N, K // 16), dtype=torch.int32, device="cuda")
    return PackedSlices(
        q,
        (torch.rand(K // g, N, device="cuda") * 0.01 + 0.001).half(),
        (torch.rand(K // g, N, device="cuda") * 3).half(),
        g,
    )


# capture once, median ms per replay (benchmarks/kernels.py: its module name would clash with the kernels/ package)
time_graph = runpy.run_path(str(Path(__file__).parents[1] / "kernels.py"))["time_graph"]


M = 2048
layers = [{n: rpack(*SHAPES[n]) for n in SHAPES} for _ in range(2)]
W16 = {n: torch.randn(*SHAPES[n], device="cuda").half() for n in SHAPES}
xin = {K: torch.randn(M, K, device="cuda").half() for K in (4096, 14336)}
outs = {n: torch.empty(M, N, device="cuda").half() for n, (N, K) in SHAPES.items()}


def fp16():
    for L in layers:
        for n, (N, K) in SHAPES.items():
            torch.mm(xin[K], W16[n].t(), out=outs[n])


t16 = time_graph(fp16)
log(f"cublas {t16:.3f} ms")
g = torch.Generator().manual_seed(4)
cases = {
    "mixed": torch.randint(1, 5, (M,), generator=g),
    "1": torch.ones(M, dtype=torch.int64),
    "2": torch.full((M,), 2),
    "3": torch.full((M,), 3),
    "4": torch.full((M,), 4),
}
cfgs = {"tuned": None}
res = dict(cublas_ms=t16, rows=[])
for cname, kv in cases.items():
    k = kv.to(torch.int32).cuda()
    mk = kv.float().mean().item()
    for mod_name, mod in (("old", OLD), ("seg-searchsorted", NEW)):
        for fname, cfg in cfgs.items():
            if mod_name == "old" and fname != "tuned":
                continue
            # correctness on one gate-shaped layer first
            p = layers[0]["gate"]
            y = torch.full((M, 14336), float("nan"), device="cuda").half()
            try:
                mod.sliced_gemm(xin[4096], p, k, out=y, config=cfg)
            except Exception as e:
                log(f"{cname} {mod_name} {fname}: {type(e).__name__} {str(e)[:200]}")
                continue
            ref = sliced_gemv_ref(xin[4096][:256].float(), p, k[:256]).float()
            err = ((y[:256].float() - ref).abs().max() / ref.abs().max()).item()
            ok = bool(torch.isfinite(y).all()) and err < 2e-3

            def run():
                for L in layers:
                    for n, (N, K) in SHAPES.items():
                        mod.sliced_gemm(xin[K], L[n], k, out=outs[n], config=cfg)

            t = time_graph(run)
            res["rows"].append(
                dict(
                    k=cname,
                    mod=mod_name,
                    cfg=fname,
                    ms=t,
                    mean_k=mk,
                    ok=ok,
                    err=err,
                    vs_cublas=t16 / t,
                    per_slice_token=mk * t16 / t,
                )
            )
            log(
                f"k={cname:5s} {mod_name} {fname:18s} {t:7.3f} ms  {100 * t16 / t:5.1f} % plain  "
                f"{100 * mk * t16 / t:5.1f} % per slice-token  err {err:.1e} {'ok' if ok else 'FAIL'}"
            )
json.dump(res, open(f"{OUT}/prefill_segments_ab.json", "w"), indent=1)
