"""One linear's launch making its own int8 codes from the glue before it (``sliced_gemv_cc(..., glue=)``, the
nineteenth session's given graph, ``given_graph.patch``) against the same launch on codes made before it (H100).

Why: at budgets that route nothing (B_1, B_E, uniform k), the int8 decode step still launches three router kernels
per block (the norms before q/k/v and gate/up, SiLU·up before down_proj, and x's int8 codes); without them the step
took 1.600 instead of 1.761 ms at budget 2 (``step_overhead.py`` PARTS=skipglue). With the patch, each program of
the linear computes the glue and the codes of its split's groups itself, stores them in a workspace region of its
own and reads them back through L2. This times that prologue per unit of LLaMA-3-8B (q/k/v, gate/up, down) at
k = 1, 2, 4, each case as 20 chained launches in one CUDA graph (median of 5 replays, µs per launch): codes given,
the glue (norm or SiLU·up), and the glue with x given (``Prologue(3, x)``: the quantizer alone).

    git apply benchmarks/experiments/given_graph.patch     # on a copy of the tree
    OUT=/tmp python3 -P benchmarks/experiments/glue_linear.py   # $OUT/glue_linear_h100.json
"""

import datetime
import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import triton
from mobiquant.kernels import pack_slices, quantize_x_int8, sliced_gemv_cc
from mobiquant.kernels import router as rk
from mobiquant.kernels.decode_step import add_rms_norm, silu_mul

sys.path.insert(0, str(Path(__file__).parents[2] / "tests" / "kernels"))
from kernel_helpers import make_weight  # noqa: E402

UNITS = (("qkv", [4096, 1024, 1024], 4096, "norm"), ("gate_up", [14336, 14336], 4096, "norm"),
         ("down", [4096], 14336, "silu"))


def launch_us(fn, n: int = 20, reps: int = 5) -> float:
    """µs per launch: n launches of fn captured in one graph, median of reps replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(out)


def main():
    import transformers

    res = dict(info=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         transformers=transformers.__version__,
                         date=datetime.datetime.now().isoformat(timespec="seconds"),
                         patch="benchmarks/experiments/given_graph.patch"), rows={})
    g = torch.Generator().manual_seed(0)
    print("| unit | k | codes given, µs | glue, µs | glue, x given, µs |\n|---|---|---|---|---|")
    for name, Ns, K, kind in UNITS:
        packs = [pack_slices(*make_weight(N, K, 128, 7 + i, "cuda", 0.05)[:3]) for i, N in enumerate(Ns)]
        P = packs if len(packs) > 1 else packs[0]
        a = (torch.randn(1, K, generator=g) * 3).half().cuda()
        b = (torch.randn(1, K, generator=g) * 2).half().cuda()
        w = (torch.rand(K, generator=g) + 0.5).half().cuda()
        x = add_rms_norm(a, b, w, 1e-5)[1] if kind == "norm" else silu_mul(a, b)
        codes = quantize_x_int8(x)
        glue = rk.prologue(None, (a, b, w, 1e-5) if kind == "norm" else None, (a, b) if kind == "silu" else None, K,
                           "glue_linear", x_out=False)
        quant = rk.Prologue(3, x, None, None)
        for kk in (1, 2, 4):
            k = torch.full((1, len(Ns)), kk, dtype=torch.int32, device="cuda")
            k = k if len(Ns) > 1 else k[0]
            row = dict(given_us=launch_us(partial(sliced_gemv_cc, x, P, k, x_int8=codes)),
                       glue_us=launch_us(partial(sliced_gemv_cc, x, P, k, glue=glue)),
                       glue_x_us=launch_us(partial(sliced_gemv_cc, x, P, k, glue=quant)))
            res["rows"][f"{name}_k{kk}"] = row
            print(f"| {name} | {kk} | {row['given_us']:.2f} | {row['glue_us']:.2f} | {row['glue_x_us']:.2f} |",
                  flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "glue_linear_h100.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
