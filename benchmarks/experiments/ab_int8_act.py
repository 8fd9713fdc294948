# ruff: noqa: B023  (each timed closure runs inside the loop iteration that defines it)
"""A/B on the H100: the batch-1 decode kernel with int8 activations (``sliced_gemv_cc(..., x_int8=)``, mma.sync
m16n8k32 on the 2-bit codes as bytes) against the fp16 path of record (v7 / v8, tuned configs).

Why: at k = 1 the fp16 path is bound by instructions (2.1 SASS per weight, KERNEL_NOTES.md "Tenth session"); the int8
path takes the codes to the tensor cores with one AND per four weights (k = 1) and leaves the products and sums to
the tensor cores in exact integers. It changes the numerics (x rounded to 8 bits per group of 128), so it is an
option. This script measures, in one process:

1. correctness: per unit and k, the int8 path against the dense reference on the dequantized activations (the
   path's own arithmetic), and against the fp16 path on x (the effect of rounding x);
2. per unit (q/k/v, o, gate/up, down as the decode engine launches them), µs per launch of 32 launches over 32
   layers' weights in one CUDA graph: fp16 path and int8 path on the tuned configs, and the quantizer launch;
3. a tile sweep of the int8 path per unit (rows per program, warps, split-K; PF 1), and the tile it picks;
4. the fused 32-layer stack at k = 1..4: fp16 tuned; int8 on the fp16 path's tuned tiles, on the swept tiles and on
   its own configs (``sliced_gemv_cc_a8`` entries), x quantized before the graph (as the engine's router launch
   leaves it); int8 on the swept tiles with the four quantizer launches per layer inside the graph.

    OUT=/tmp python3 -P benchmarks/experiments/ab_int8_act.py     # writes $OUT/int8_act_ab_h100.json
    PARTS=checks,stack ...                                        # a subset of checks,units,sweep,stack
    STACK_VARIANTS='{"gu 64": {"gu": {"BLOCK_N": 64}}}' ...      # int8 stacks on its configs, overridden
"""

import importlib.util
import itertools
import json
import os
import time
from pathlib import Path

import torch
import triton
from mobiquant.kernels import dequantize_x_int8, quantize_x_int8, sliced_gemv_cc

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))
UNITS, unit_args, unit_K, unit_config = FS.UNITS, FS.unit_args, FS.unit_K, FS.unit_config
TILES = [dict(BLOCK_N=bn, num_warps=w, SPLIT_K=sk, GPI=1, PF=1, PDL=1, num_stages=1)
         for (bn, w), sk in itertools.product(((64, 4), (128, 4), (128, 8), (256, 4)), (2, 4, 8, 16))]


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC"), checks=[], units=[], sweep=[], picked={}, stack=[])
    layers = FS.quantized_layers()
    xin = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    x8 = {K: quantize_x_int8(x) for K, x in xin.items()}
    outs = {u: torch.empty(1, sum(KB.SHAPES[n][0] for n in UNITS[u]), device="cuda", dtype=torch.float16)
            for u in UNITS}
    tuned = {u: unit_config(u) for u in UNITS}
    tuned8 = {u: unit_config(u, "sliced_gemv_cc_a8") or tuned[u] for u in UNITS}  # the int8 path's entries
    parts = os.environ.get("PARTS", "checks,units,sweep,stack").split(",")
    out_name = os.environ.get("OUT_NAME", "int8_act_ab_h100.json")
    dump = lambda: (OUT / out_name).write_text(json.dumps(res, indent=1))  # noqa: E731
    # 1. correctness
    for u in UNITS if "checks" in parts else ():
        K = unit_K(u)
        xd = dequantize_x_int8(*x8[K])
        for kk in (1, 2, 3, 4):
            w, k = unit_args(layers[0], u, kk)
            y8 = sliced_gemv_cc(xin[K], w, k, config=tuned[u], x_int8=x8[K]).float()
            y16 = sliced_gemv_cc(xin[K], w, k, config=tuned[u]).float()
            ref = torch.cat([KB.sliced_gemv_ref(xd, layers[0][n], k.view(-1)[:1]).float() for n in UNITS[u]], 1)
            rel = ((y8 - ref).norm() / ref.norm()).item()
            rel16 = ((y8 - y16).norm() / y16.norm()).item()
            res["checks"].append(dict(unit=u, k=kk, rel_err_dense_dequantized_x=rel, rel_diff_fp16_path=rel16))
            print(f"check {u:5s} k={kk}: ||int8 - dense(x dequantized)|| / ||.|| {rel:.1e}   "
                  f"||int8 - fp16 path|| / ||.|| {rel16:.1e}", flush=True)
            assert rel < 2e-3, (u, kk, rel)
    dump()

    def time_unit(u, kk, cfg, a8):
        args = [unit_args(L, u, kk) for L in layers]
        K = unit_K(u)
        xa = x8[K] if a8 else None
        return KB.time_graph(lambda: [sliced_gemv_cc(xin[K], w, k, out=outs[u], config=cfg, x_int8=xa)
                                      for w, k in args]) / len(layers) * 1e3

    # 2. per unit, tuned configs
    for u in UNITS if "units" in parts else ():
        K = unit_K(u)
        tq = KB.time_graph(lambda: [quantize_x_int8(xin[K], out=x8[K]) for _ in layers]) / len(layers) * 1e3
        for kk in (1, 2, 3, 4):
            t16, t8 = time_unit(u, kk, tuned[u], False), time_unit(u, kk, tuned[u], True)
            res["units"].append(dict(unit=u, k=kk, fp16_us=t16, int8_us=t8, quantize_us=tq))
            print(f"unit {u:5s} k={kk}: fp16 {t16:7.2f} us  int8 {t8:7.2f} us  (quantizer {tq:5.2f} us)", flush=True)
    dump()
    # 3. tile sweep of the int8 path (the tuned tile is a candidate too)
    for u in UNITS if "sweep" in parts else ():
        best = None
        for tile in [{c: v for c, v in tuned[u].items() if c not in ("MMA", "SPLIT_K12")}] + TILES:
            per_k = [time_unit(u, kk, tile, True) for kk in (1, 2, 3, 4)]
            res["sweep"].append(dict(unit=u, tile=tile, us=per_k))
            print(f"sweep {u:5s} BN {tile['BLOCK_N']:3d} w {tile['num_warps']} SK {tile['SPLIT_K']:2d}: "
                  + " ".join(f"{v:6.2f}" for v in per_k), flush=True)
            if best is None or sum(per_k) < best[0]:
                best = (sum(per_k), tile, per_k)
        res["picked"][u] = dict(config=best[1], us=best[2])
        print(f"picked {u}: {best[1]}  {[round(v, 2) for v in best[2]]}", flush=True)
        dump()
    # 4. fused stack
    swept = {u: res["picked"][u]["config"] for u in UNITS} if res["picked"] else tuned
    for kk in (1, 2, 3, 4) if "stack" in parts else ():
        A = [{u: unit_args(L, u, kk) for u in UNITS} for L in layers]

        def stack(cfgs, a8, quant):
            for L in A:
                for u in UNITS:
                    K = unit_K(u)
                    if quant:
                        quantize_x_int8(xin[K], out=x8[K])
                    w, k = L[u]
                    sliced_gemv_cc(xin[K], w, k, out=outs[u], config=cfgs[u], x_int8=x8[K] if a8 else None)

        variants = {"fp16, tuned": (tuned, False, False), "int8, tuned tiles": (tuned, True, False),
                    "int8, swept tiles": (swept, True, False), "int8 + quantizer, swept": (swept, True, True)}
        variants["int8, its configs (_a8)"] = (tuned8, True, False)
        # STACK_VARIANTS='{"name": {"unit": {"SPLIT_K": 8}}}': int8 on its configs with some entries overridden
        for name, over in json.loads(os.environ.get("STACK_VARIANTS") or "{}").items():
            variants[name] = ({u: dict(tuned8[u], **over.get(u, {})) for u in UNITS}, True, False)
        t = {}
        for _ in range(3):
            for name, v in variants.items():
                t.setdefault(name, []).append(KB.time_graph(lambda: stack(*v)))
        for name, v in t.items():
            res["stack"].append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name:26s}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)
    res["swept_configs"] = swept
    dump()


if __name__ == "__main__":
    main()
