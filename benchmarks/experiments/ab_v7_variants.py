# ruff: noqa: B007, B023  (the timed closures run inside the loop that defines them)
"""A/B on the H100: committed v7 vs the pipelined-words variant (PF=3) per launch unit, then 32-layer stacks."""

import importlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from mobiquant.kernels.layout import PackedSlices
from mobiquant.kernels.sliced_gemv import sliced_gemv_ref
from mobiquant.kernels.tuning import lookup

B = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")
VARIANTS = os.environ.get("VARIANTS", "loads")  # loads (cc8 = the kernel + v7_pf3_xl1.patch), rows, mma, mma2
N8 = importlib.import_module("mobiquant.kernels.cc8") if VARIANTS == "loads" else None

OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:5.0f}s]", *a, flush=True)


PRE = os.environ.get("PRECOMPILE") == "1"
torch.manual_seed(0)


def rpack(N, K, E=4, g=128):
    q = torch.randint(-(2**31), 2**31 - 1, (E, N, K // 16), dtype=torch.int32, device="cuda")
    s = (torch.rand(K // g, N, device="cuda") * 0.01 + 0.001).half()
    z = (torch.rand(K // g, N, device="cuda") * 3).half()
    return PackedSlices(q, s, z, g)


UNITS = {
    "qkv": [(4096, 4096), (1024, 4096), (1024, 4096)],
    "o": [(4096, 4096)],
    "gu": [(14336, 4096), (14336, 4096)],
    "down": [(4096, 14336)],
    "k": [(1024, 4096)],
    "gate": [(14336, 4096)],
}


def base_cfg(u):
    Ns = sum(n for n, _ in UNITS[u])
    K = UNITS[u][0][1]
    return dict(lookup("sliced_gemv_cc", 1, Ns, K))


def variants(u):
    b = base_cfg(u)
    if os.environ.get("VARIANTS") == "mma":  # tensor cores from registers (MMA = 1), committed kernel
        v = {"base": ("B", b)}
        for bn, nw in ((64, 4), (128, 4), (32, 2), (64, 2)):
            for f in (1, 2):
                sk = b["SPLIT_K"] * f
                for pf in (0, 1):
                    if sk <= 16:
                        v[f"mma bn{bn} w{nw} sk{sk} pf{pf}"] = ("B", dict(b, BLOCK_N=bn, num_warps=nw, SPLIT_K=sk,
                                                                          PF=pf, MMA=1))
        return v
    if os.environ.get("VARIANTS") == "mma2":  # the tensor-core path unrolled by two (PF = 2) against the tuned configs
        v = {"base": ("B", b)}
        for bn, nw in ((64, 4), (128, 4), (64, 2)):
            for f in (1, 2):
                sk = b["SPLIT_K"] * f
                if sk <= 16:
                    v[f"mma pf2 bn{bn} w{nw} sk{sk}"] = ("B", dict(b, BLOCK_N=bn, num_warps=nw, SPLIT_K=sk, PF=2,
                                                                 MMA=15))
        return v
    if os.environ.get("VARIANTS") == "rows":  # more rows per thread (committed kernel, configs only)
        v = {"base": ("B", b)}
        for bn, nw in ((256, 4), (256, 8), (128, 2), (512, 8)):
            for f in (1, 2, 4):
                sk = b["SPLIT_K"] * f
                for pf in (1, 2):
                    if sk <= 32:
                        v[f"bn{bn} w{nw} sk{sk} pf{pf}"] = ("B", dict(b, BLOCK_N=bn, num_warps=nw, SPLIT_K=sk, PF=pf))
        return v
    v = {"base": ("B", b), "xl1": ("N", dict(b, XL1=1))}
    v[f"xl1 pf{3 - b['PF']}"] = ("N", dict(b, XL1=1, PF=3 - b["PF"]))
    for f in (2, 0.5):
        sk = int(b["SPLIT_K"] * f)
        if 2 <= sk <= 16:
            v[f"xl1 sk{sk}"] = ("N", dict(b, XL1=1, SPLIT_K=sk))
            v[f"xl1 sk{sk} pf{3 - b['PF']}"] = ("N", dict(b, XL1=1, SPLIT_K=sk, PF=3 - b["PF"]))
    return v


def call(mod, x, packs, k, y, cfg):
    m = B if mod == "B" else N8
    if len(packs) == 1:
        return m.sliced_gemv_cc(x, packs[0], k[:, 0].contiguous() if k.dim() == 2 else k, out=y, config=cfg)
    return m.sliced_gemv_cc(x, packs, k, out=y, config=cfg)


# capture once, median ms per replay (benchmarks/kernels.py: its module name would clash with the kernels/ package)
time_graph = runpy.run_path(str(Path(__file__).parents[1] / "kernels.py"))["time_graph"]


units = [u for u in os.environ.get("UNITS", "qkv,o,gu,down,k,gate").split(",")]
res = dict(per_unit={}, checks=[], stacks={})
NC = 4  # weight copies the per-unit graph rotates over (from DRAM)
for u in units:
    K = UNITS[u][0][1]
    copies = [[rpack(n, kk) for n, kk in UNITS[u]] for _ in range(1 if PRE else NC)]
    Ns = sum(n for n, _ in UNITS[u])
    x = torch.randn(1, K, device="cuda").half()
    y = torch.empty(1, Ns, device="cuda").half()
    res["per_unit"][u] = {}
    for name, (mod, cfg) in variants(u).items():
        ok = True
        for kk in (1, 2, 3, 4):
            kt = torch.full((1, len(UNITS[u])), kk, dtype=torch.int32, device="cuda")
            y.fill_(float("nan"))
            call(mod, x, copies[0], kt, y, cfg)
            torch.cuda.synchronize()
            if PRE:
                continue
            ref = torch.cat([sliced_gemv_ref(x.float(), p, kt[:, 0]).float() for p in copies[0]], 1)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            if not (torch.isfinite(y).all() and err < 2e-3):
                ok = False
                log(f"FAIL {u} {name} k={kk} err {err}")
            res["checks"].append(dict(unit=u, variant=name, k=kk, max_rel=err))
        if PRE:
            continue
        ts = []
        for kk in (1, 2, 3, 4):
            kt = torch.full((1, len(UNITS[u])), kk, dtype=torch.int32, device="cuda")

            def run():
                for i in range(20):
                    call(mod, x, copies[i % NC], kt, y, cfg)

            ts.append(1e3 * time_graph(run) / 20)
        res["per_unit"][u][name] = dict(cfg=cfg, us=ts, ok=ok)
        log(
            f"{u:5s} {name:22s} "
            + " / ".join(f"{t:6.2f}" for t in ts)
            + f"  sum {sum(ts):6.1f}  {'ok' if ok else 'FAIL'}"
        )
    copies = None
    torch.cuda.empty_cache()
if PRE:
    log("precompiled")
    sys.exit(0)
json.dump(res, open(f"{OUT}/v7_variants_ab.json", "w"), indent=1)

# best new variant per unit (smallest sum over k), then stacks
best = {}
for u, d in res["per_unit"].items():
    cand = {n: v for n, v in d.items() if n != "base" and v["ok"]}
    if cand:
        bn = min(cand, key=lambda n: sum(cand[n]["us"]))
        best[u] = cand[bn]["cfg"]
        log(f"best {u}: {bn} {sum(cand[bn]['us']):.1f} vs base {sum(d['base']['us']):.1f}")
res["best"] = best
json.dump(res, open(f"{OUT}/v7_variants_ab.json", "w"), indent=1)
L = int(os.environ.get("LAYERS", "32"))
if all(u in best for u in ("qkv", "o", "gu", "down")):
    layers = [{u: [rpack(n, kk) for n, kk in UNITS[u]] for u in ("qkv", "o", "gu", "down")} for _ in range(L)]
    xin = {4096: torch.randn(1, 4096, device="cuda").half(), 14336: torch.randn(1, 14336, device="cuda").half()}
    ys = {u: torch.empty(1, sum(n for n, _ in UNITS[u]), device="cuda").half() for u in UNITS}
    for rnd in range(2):
        for kk in (1, 2, 3, 4):
            row = {}
            for tag in ("base", "new"):

                def run():
                    for Ld in layers:
                        for u in ("qkv", "o", "gu", "down"):
                            kt = KT[u]
                            if tag == "base":
                                call("B", xin[UNITS[u][0][1]], Ld[u], kt, ys[u], base_cfg(u))
                            else:
                                call("N" if N8 else "B", xin[UNITS[u][0][1]], Ld[u], kt, ys[u], best[u])

                KT = {u: torch.full((1, len(UNITS[u])), kk, dtype=torch.int32, device="cuda") for u in UNITS}
                row[tag] = time_graph(run, reps=10, inner=2)
            res["stacks"].setdefault(f"engine{L}", []).append(dict(k=kk, round=rnd, **row))
            log(f"stack engine-style {L} layers k={kk}: base {row['base']:.3f} ms  new {row['new']:.3f} ms")
    if all(u in best for u in ("k", "gate")):
        SEP = {
            "q": ("o", 0),
            "k": ("k", 0),
            "v": ("k", 0),
            "o": ("o", 0),
            "gate": ("gate", 0),
            "up": ("gate", 0),
            "down": ("down", 0),
        }
        for rnd in range(2):
            for kk in (1, 2, 3, 4):
                kt1 = torch.full((1,), kk, dtype=torch.int32, device="cuda")
                row = {}
                for tag in ("base", "new"):

                    def run7():
                        for Ld in layers:
                            for name, (u, _) in SEP.items():
                                src = {
                                    "q": Ld["qkv"][0],
                                    "k": Ld["qkv"][1],
                                    "v": Ld["qkv"][2],
                                    "o": Ld["o"][0],
                                    "gate": Ld["gu"][0],
                                    "up": Ld["gu"][1],
                                    "down": Ld["down"][0],
                                }[name]
                                cfg = base_cfg(u) if tag == "base" else best[u]
                                mod = "B" if tag == "base" or N8 is None else "N"
                                call(mod, xin[src.in_features], [src], kt1, ys[u], cfg)

                    row[tag] = time_graph(run7, reps=10, inner=2)
                res["stacks"].setdefault(f"separate{L}", []).append(dict(k=kk, round=rnd, **row))
                log(f"stack 7 launches {L} layers k={kk}: base {row['base']:.3f} ms  new {row['new']:.3f} ms")
json.dump(res, open(f"{OUT}/v7_variants_ab.json", "w"), indent=1)
log("done")
