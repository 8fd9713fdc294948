# ruff: noqa: B023  (the timed closure runs inside the loop iteration that defines it)
"""Shared by this folder's batch-1 A/B scripts: 32 LLaMA-3-8B layers quantized by the library, and the fused 32-layer
decode stack (q/k/v and gate/up one launch each, as the decode engine launches them) timed for several variants of
``sliced_gemv_cc`` in alternating rounds. Loaded by path (``load``), since the scripts run with ``python3 -P``."""

import importlib.util
from pathlib import Path

import torch


def load(path: Path, name: str):
    """A module from a file path (benchmarks/kernels.py, this file)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KB = load(Path(__file__).parents[1] / "kernels.py", "kbench")


UNITS = {"qkv": ("q", "k", "v"), "o": ("o",), "gu": ("gate", "up"), "down": ("down",)}  # launches, as the engine's


def unit_args(L: dict, u: str, kk: int):
    """(weights, k) of launch unit u of layer L at kk slices: a list and (1, S) counts for q/k/v and gate/up."""
    ws = [L[n] for n in UNITS[u]]
    k = torch.full((1, len(ws)), kk, dtype=torch.int32, device="cuda")
    return (ws, k) if len(ws) > 1 else (ws[0], k[:, 0].contiguous())


def unit_K(u: str) -> int:
    return KB.SHAPES[UNITS[u][0]][1]


def unit_config(u: str, kernel: str = "sliced_gemv_cc") -> dict | None:
    """The tuned config of unit u (its total N) for ``kernel`` (``sliced_gemv_cc_a8``: the int8 path's entries)."""
    from mobiquant.kernels.tuning import lookup

    return lookup(kernel, 1, sum(KB.SHAPES[n][0] for n in UNITS[u]), unit_K(u))


def quantized_layers(n: int = 32) -> list[dict]:
    torch.manual_seed(0)
    return [{name: KB.quantize_layer(torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02)
             for name, (N, K) in KB.SHAPES.items()} for _ in range(n)]


def time_fused_stack(variants: dict, layers: list[dict], ks=(1, 2, 3, 4), rounds: int = 3) -> list[dict]:
    """variants: name -> (sliced_gemv_cc function, configs {"qkv", "o", "gu", "down"} or None for the tuned ones).
    Best of ``rounds`` alternating rounds per k; prints and returns one row per variant and k."""
    xin = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K in (4096, 14336)}
    o = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    d = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    y_qkv = torch.empty(1, 6144, device="cuda", dtype=torch.float16)
    y_gu = torch.empty(1, 28672, device="cuda", dtype=torch.float16)
    rows = []
    for kk in ks:
        k = torch.tensor([kk], dtype=torch.int32, device="cuda")
        k3, k2 = k.view(1, 1).expand(1, 3).contiguous(), k.view(1, 1).expand(1, 2).contiguous()
        t = {}
        for _ in range(rounds):
            for name, (fn, cfg) in variants.items():
                c = cfg or {}

                def run():
                    for L in layers:
                        fn(xin[4096], [L[n] for n in ("q", "k", "v")], k3, out=y_qkv, config=c.get("qkv"))
                        fn(xin[4096], L["o"], k, out=o, config=c.get("o"))
                        fn(xin[4096], [L["gate"], L["up"]], k2, out=y_gu, config=c.get("gu"))
                        fn(xin[14336], L["down"], k, out=d, config=c.get("down"))
                t.setdefault(name, []).append(KB.time_graph(run))
        for name, v in t.items():
            rows.append(dict(variant=name, k=kk, ms=min(v), runs=v))
            print(f"fused stack k={kk} {name:12s}: {min(v):.3f} ms  {[round(x, 3) for x in v]}", flush=True)
    return rows
