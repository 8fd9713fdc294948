# ruff: noqa: B023  (each timed closure runs inside the loop iteration that defines it)
"""A/B on the H100: the batch-1 decode kernel's words, s_1 and z_1 streamed through a shared-memory ring by bulk
copies (``RING`` config bits, kernels/bulk_ring.py) against the register loads of record (v8 fp16, v10 int8).

Why: the eleventh session left both paths within 4-6 % of a reader that does their register loads and nothing
else, and that reader 26 % (k = 1) / 13 % (k = 2) slower than a contiguous read of the same bytes: one group in
flight per warp is not enough bytes in flight. The ring keeps up to 8 groups in flight per program without
registers. This script measures, in one process:

1. correctness: per unit, k and path (fp16 / int8 activations), the ring's output against the register loads'
   (bit for bit: same arithmetic in the same order), also 4 tokens at mixed k and a partial last tile;
2. the fused 32-layer stack at k = 1..4 (as benchmarks/kernels.py times it, x's int8 codes made before the graph),
   in alternating rounds: the configs of record, the ring at every k, the ring with a stage cap, and the ring with
   fewer splits (longer programs, which a deep pipeline may prefer).

    OUT=/tmp python3 -P benchmarks/experiments/ab_ring.py        # writes $OUT/ring_ab_h100.json
    PARTS=checks ...; VARIANTS='{"name": [a8, {"unit": {"RING": 15}}]}' ...   # extra stack variants
    KEEP='int8, of record|int8, ring' ...                                     # a subset of the built-in ones
    KS=1,2 ...                                                                # the stack at these k only
"""

import importlib.util
import json
import os
import time
from pathlib import Path

import torch
import triton
from mobiquant.kernels import quantize_x_int8, sliced_gemv_cc

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))
UNITS, unit_args, unit_K, unit_config = FS.UNITS, FS.unit_args, FS.unit_K, FS.unit_config


def checks(res, layers):
    """The ring against the register loads, bit for bit."""
    for u in UNITS:
        K = unit_K(u)
        x = torch.randn(4, K, device="cuda", dtype=torch.float16)
        x8 = quantize_x_int8(x)
        for a8 in (False, True):
            cfg = (unit_config(u, "sliced_gemv_cc_a8") if a8 else None) or unit_config(u)
            for kk in (1, 2, 3, 4, "mixed"):
                M = 4 if kk == "mixed" else 1
                w, k = unit_args(layers[0], u, 1)
                k = (torch.tensor([1, 3, 2, 4], dtype=torch.int32, device="cuda").view(4, 1).expand(4, k.numel())
                     .contiguous() if M == 4 else torch.full_like(k, kk))
                if not isinstance(w, list):
                    k = k.view(-1)
                xa = (x8[0][:M], x8[1][:M]) if a8 else None
                y0 = sliced_gemv_cc(x[:M], w, k, config=dict(cfg, RING=0), x_int8=xa)
                mma = {} if a8 else {"MMA": 15}
                y1 = sliced_gemv_cc(x[:M], w, k, config=dict(cfg, RING=15, **mma), x_int8=xa)
                y2 = sliced_gemv_cc(x[:M], w, k, config=dict(cfg, RING=0, **mma), x_int8=xa)
                y3 = sliced_gemv_cc(x[:M], w, k, config=dict(cfg, RING=15, REARLY=1, SPLIT_K12=cfg["SPLIT_K"], **mma),
                                    x_int8=xa)
                y4 = sliced_gemv_cc(x[:M], w, k, config=dict(cfg, RING=0, SPLIT_K12=cfg["SPLIT_K"], **mma), x_int8=xa)
                y5 = sliced_gemv_cc(x[:M], w, k, config=dict(cfg, RING=15, REARLY=1, **mma), x_int8=xa)  # its SK12
                same = bool(torch.equal(y1, y2)) and bool(torch.equal(y3, y4)) and bool(torch.equal(y5, y2))
                fin = bool(torch.isfinite(y1).all())
                rel = ((y1.float() - y0.float()).norm() / y0.float().norm()).item()
                res["checks"].append(dict(unit=u, a8=a8, k=kk, ring_equals_register=same, finite=fin,
                                          rel_to_record=rel))
                print(f"check {u:5s} {'int8' if a8 else 'fp16'} k={kk}: ring == register loads {same}, finite {fin},"
                      f" vs configs of record {rel:.1e}", flush=True)
                assert same and fin, (u, a8, kk)
    # a partial last tile (N = 1000 = 7 x 128 + 104 rows) and N not a multiple of 8 (the ring is turned off)
    for N in (1000, 781):
        p = KB.quantize_layer(torch.randn(N, 4096, device="cuda", dtype=torch.float16) * 0.02)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
        for kk in (1, 2, 3, 4):
            k = torch.tensor([kk], dtype=torch.int32, device="cuda")
            cfg = dict(BLOCK_N=128, SPLIT_K=4, num_warps=4, PF=1, PDL=1, MMA=15)
            ref = sliced_gemv_cc(x, p, k, config=cfg)
            ref12 = sliced_gemv_cc(x, p, k, config=dict(cfg, SPLIT_K12=2))
            same = all(bool(torch.equal(sliced_gemv_cc(x, p, k, config=dict(cfg, **c)), ref))
                       for c in ({"RING": 15}, {"RING": 15, "REARLY": 1}, {"RING": 15, "RCAP": 1}))
            same = same and bool(torch.equal(sliced_gemv_cc(x, p, k, config=dict(cfg, RING=15, REARLY=1,
                                                                                  SPLIT_K12=2)), ref12))
            res["checks"].append(dict(unit=f"N={N}", a8=False, k=kk, ring_equals_register=same))
            print(f"check N={N} k={kk}: ring == register loads {same}", flush=True)
            assert same, (N, kk)


def stack(res, layers, variants):
    xin = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    x8 = {K: quantize_x_int8(x) for K, x in xin.items()}
    outs = {u: torch.empty(1, sum(KB.SHAPES[n][0] for n in UNITS[u]), device="cuda", dtype=torch.float16)
            for u in UNITS}
    for kk in [int(v) for v in os.environ.get("KS", "1,2,3,4").split(",")]:
        A = [{u: unit_args(L, u, kk) for u in UNITS} for L in layers]

        def run(cfgs, a8):
            for L in A:
                for u in UNITS:
                    w, k = L[u]
                    sliced_gemv_cc(xin[unit_K(u)], w, k, out=outs[u], config=cfgs[u],
                                   x_int8=x8[unit_K(u)] if a8 else None)

        t = {}
        for _ in range(3):
            for name, (cfgs, a8) in variants.items():
                t.setdefault(name, []).append(KB.time_graph(lambda: run(cfgs, a8)))
        for name, v in t.items():
            res["stack"].append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name:34s}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC"), checks=[], stack=[])
    parts = os.environ.get("PARTS", "checks,stack").split(",")
    out_name = os.environ.get("OUT_NAME", "ring_ab_h100.json")
    layers = FS.quantized_layers()
    if "checks" in parts:
        checks(res, layers)
        (OUT / out_name).write_text(json.dumps(res, indent=1))
    if "stack" in parts:
        t16 = {u: unit_config(u) for u in UNITS}
        t8 = {u: unit_config(u, "sliced_gemv_cc_a8") or t16[u] for u in UNITS}
        over = lambda base, d: {u: dict(base[u], **d.get(u, {})) for u in UNITS}  # noqa: E731
        allu = lambda d: {u: d for u in UNITS}  # noqa: E731
        variants = {
            "fp16, of record": (t16, False),
            "fp16, ring": (over(t16, allu({"RING": 15, "MMA": 15})), False),
            "int8, of record": (t8, True),
            "int8, ring": (over(t8, allu({"RING": 15})), True),
            "int8, ring, early": (over(t8, allu({"RING": 15, "REARLY": 1})), True),
            "int8, ring, early, gu 2 splits": (over(t8, dict(allu({"RING": 15, "REARLY": 1}),
                                                             gu={"RING": 15, "REARLY": 1, "SPLIT_K": 2,
                                                                 "SPLIT_K12": 2})), True),
            "fp16, ring, early": (over(t16, allu({"RING": 15, "REARLY": 1, "MMA": 15})), False),
        }
        keep = os.environ.get("KEEP")  # a subset of the variants above, by name ("|"-separated)
        if keep:
            variants = {n: v for n, v in variants.items() if n in keep.split("|")}
        for name, (a8, d) in json.loads(os.environ.get("VARIANTS") or "{}").items():
            variants[name] = (over(t8 if a8 else t16, d), bool(a8))
        res["configs"] = {n: v[0] for n, v in variants.items()}
        stack(res, layers, variants)
        (OUT / out_name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
