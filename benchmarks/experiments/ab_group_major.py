# ruff: noqa: B023  (each timed closure runs inside the loop iteration that defines it)
"""A/B on the H100: the group-major word layout (this tree) against the row-major layout of commit 3ab4381, for the
batch-1 decode kernel (v7 + v8, ``sliced_gemv_cc``), then a tile sweep per launch unit for the new layout.

Why: ``roofline_batch1.py`` read the stack's bytes with v8's own loads, grid and lanes and no arithmetic. In the
row-major layout that took as long as the kernel itself; the same loads in the group-major layout were 1.3-2.6x
faster. This script measures the real kernel in both layouts, in one process:

1. correctness: per unit and k, the new layout's output equals the old layout's bit for bit (same configs, same
   arithmetic, only the addresses differ), and both match the dense reference;
2. per unit (q/k/v, o, gate/up, down as the decode engine launches them; also k and gate alone), µs per launch of
   32 launches over 32 layers' weights in one CUDA graph, old and new layout, tuned configs;
3. a tile sweep per unit in the new layout (rows per program, warps, split-K, prefetch depth, v7 or v8 per k; the
   tuned config's tile is a candidate), and the configs it picks (smallest sum over k = 1..4 per tile, then v8 for
   the k where it is faster on that tile);
4. the fused 32-layer stack at k = 1..4: old layout, new layout with the old configs, new layout with the swept ones.

Runs with the old kernels importable as package ``kold`` (``git archive 3ab4381 kernels`` unpacked as kold/ on the
path) and this tree's package as ``mobiquant``:

    OUT=/tmp python3 -P benchmarks/experiments/ab_group_major.py      # writes $OUT/group_major_ab_h100.json
    PARTS=sweep,stack ...                                             # a subset of checks,units,sweep,stack
    STACK_VARIANTS='{"o on v8": {"o": {"MMA": 15}}}' ...              # more configs for the fused stack
"""

import importlib.util
import itertools
import json
import os
import time
from pathlib import Path

import kold
import torch
import triton
from mobiquant.kernels import pack_slices, sliced_gemv_cc
from mobiquant.kernels.tuning import lookup

spec = importlib.util.spec_from_file_location("fused_stack", Path(__file__).with_name("_fused_stack.py"))
FS = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FS)
KB = FS.KB
OUT = Path(os.environ.get("OUT", "/tmp"))
UNITS = {"qkv": ("q", "k", "v"), "o": ("o",), "gu": ("gate", "up"), "down": ("down",), "k": ("k",),
         "gate": ("gate",)}
STACK = ("qkv", "o", "gu", "down")  # the engine's four launches per layer
TILES = [dict(BLOCK_N=bn, num_warps=w, SPLIT_K=sk, GPI=1, PF=pf, PDL=1, num_stages=1)
         for (bn, w), sk, pf in itertools.product(((64, 2), (64, 4), (128, 4)), (2, 4, 8, 16), (1, 2))]


def both_layouts(n: int = 32):
    """n layers of random LLaMA-3-8B weights quantized once by the library, packed in both layouts."""
    torch.manual_seed(0)
    new, old = [], []
    for _ in range(n):
        Ln, Lo = {}, {}
        for name, (N, K) in KB.SHAPES.items():
            W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
            codes, s1, z1 = KB.slices.decompose(W.float(), KB.GROUP, KB.BITS)
            planes = [KB.packing.pack_nbit_u8(c, 2) for c in codes]
            Ln[name] = pack_slices(planes, s1.half(), z1.half(), KB.BITS)
            Lo[name] = kold.pack_slices(planes, s1.half(), z1.half(), KB.BITS)
        new.append(Ln)
        old.append(Lo)
    return new, old


def unit_args(L, u, kk):
    ws = [L[n] for n in UNITS[u]]
    k = torch.full((1, len(ws)), kk, dtype=torch.int32, device="cuda")
    return (ws, k) if len(ws) > 1 else (ws[0], k[:, 0].contiguous())


def unit_config(u):
    N = sum(KB.SHAPES[n][0] for n in UNITS[u])
    return lookup("sliced_gemv_cc", 1, N, KB.SHAPES[UNITS[u][0]][1])


def time_unit(fn, layers, u, kk, cfg, x, y) -> float:
    args = [unit_args(L, u, kk) for L in layers]
    return KB.time_graph(lambda: [fn(x, w, k, out=y, config=cfg) for w, k in args]) / len(layers) * 1e3


def stack(fn, args, cfgs, xin, outs):
    """The fused stack; args: per layer, per unit, (weights, k) built outside the graph."""
    for A in args:
        for u in STACK:
            w, k = A[u]
            fn(xin[KB.SHAPES[UNITS[u][0]][1]], w, k, out=outs[u], config=cfgs[u])


def main():
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC"), checks=[], units=[], sweep=[], picked={}, stack=[])
    new, old = both_layouts()
    xin = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    outs = {u: torch.empty(1, sum(KB.SHAPES[n][0] for n in UNITS[u]), device="cuda", dtype=torch.float16)
            for u in UNITS}
    tuned = {u: unit_config(u) for u in UNITS}
    parts = os.environ.get("PARTS", "checks,units,sweep,stack").split(",")
    # 1. correctness
    for u in UNITS if "checks" in parts else ():
        K = KB.SHAPES[UNITS[u][0]][1]
        for kk in (1, 2, 3, 4):
            w, k = unit_args(new[0], u, kk)
            wo, ko = unit_args(old[0], u, kk)
            yn = sliced_gemv_cc(xin[K], w, k, config=tuned[u])
            yo = kold.sliced_gemv_cc(xin[K], wo, ko, config=tuned[u])
            ref = torch.cat([KB.sliced_gemv_ref(xin[K].float(), new[0][n], k.view(-1)[:1]).float()
                             for n in UNITS[u]], dim=1)
            rel = ((yn.float() - ref).norm() / ref.norm()).item()
            equal = torch.equal(yn, yo)
            res["checks"].append(dict(unit=u, k=kk, bit_equal_old=equal, rel_err_dense=rel))
            print(f"check {u:5s} k={kk}: new == old bit for bit: {equal}, ||err||/||ref|| {rel:.1e}", flush=True)
    out_name = os.environ.get("OUT_NAME", "group_major_ab_h100.json")
    dump = lambda: (OUT / out_name).write_text(json.dumps(res, indent=1))  # noqa: E731
    dump()
    # 2. per unit, tuned configs, both layouts
    for u in UNITS if "units" in parts else ():
        K = KB.SHAPES[UNITS[u][0]][1]
        for kk in (1, 2, 3, 4):
            t_old = time_unit(kold.sliced_gemv_cc, old, u, kk, tuned[u], xin[K], outs[u])
            t_new = time_unit(sliced_gemv_cc, new, u, kk, tuned[u], xin[K], outs[u])
            res["units"].append(dict(unit=u, k=kk, old_us=t_old, new_us=t_new))
            print(f"unit {u:5s} k={kk}: row-major {t_old:7.2f} us  group-major {t_new:7.2f} us", flush=True)
    dump()
    # 3. tile sweep, new layout (the tuned config's tile is a candidate too)
    for u in UNITS if "sweep" in parts else ():
        K = KB.SHAPES[UNITS[u][0]][1]
        best = None
        for tile in [{c: v for c, v in tuned[u].items() if c != "MMA"}] + TILES:
            t = {}
            for mma, kk in itertools.product((0, 15), (1, 2, 3, 4)):
                cfg = dict(tile, MMA=mma)
                t[mma, kk] = time_unit(sliced_gemv_cc, new, u, kk, cfg, xin[K], outs[u])
            per_k = [min(t[0, kk], t[15, kk]) for kk in (1, 2, 3, 4)]
            mask = sum(1 << (kk - 1) for kk in (1, 2, 3, 4) if t[15, kk] < t[0, kk])
            res["sweep"].append(dict(unit=u, tile=tile, us={f"mma{m}_k{kk}": v for (m, kk), v in t.items()}))
            print(f"sweep {u:5s} BN {tile['BLOCK_N']:3d} w {tile['num_warps']} SK {tile['SPLIT_K']:2d} "
                  f"PF {tile['PF']}: "
                  + " ".join(f"{v:6.2f}" for v in per_k) + f"  mask {mask}", flush=True)
            if best is None or sum(per_k) < best[0]:
                best = (sum(per_k), dict(tile, MMA=mask), per_k)
        res["picked"][u] = dict(config=best[1], us=best[2])
        print(f"picked {u}: {best[1]}  {[round(v, 2) for v in best[2]]}", flush=True)
        dump()
    # 4. fused stack
    variants = {"row-major, tuned": (kold.sliced_gemv_cc, old, tuned),
                "group-major, tuned": (sliced_gemv_cc, new, tuned)}
    if res["picked"]:
        variants["group-major, swept"] = (sliced_gemv_cc, new, {u: res["picked"][u]["config"] for u in STACK})
    # STACK_VARIANTS='{"name": {"unit": {"MMA": 15}}}': the tuned configs with some entries overridden
    for name, over in json.loads(os.environ.get("STACK_VARIANTS", "{}")).items():
        variants[name] = (sliced_gemv_cc, new, {u: dict(tuned[u], **over.get(u, {})) for u in STACK})
    for kk in (1, 2, 3, 4) if "stack" in parts else ():
        args = {id(layers): [{u: unit_args(L, u, kk) for u in STACK} for L in layers] for layers in (new, old)}
        t = {}
        for _ in range(3):
            for name, (fn, layers, cfgs) in variants.items():
                A = args[id(layers)]
                t.setdefault(name, []).append(KB.time_graph(lambda: stack(fn, A, cfgs, xin, outs)))
        for name, v in t.items():
            res["stack"].append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name:24s}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)
    dump()


if __name__ == "__main__":
    main()
