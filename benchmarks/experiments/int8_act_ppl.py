"""WikiText-2 perplexity with the inputs of every quantized linear rounded to int8 per group, on the CPU.

What: the perplexity of the full-precision model and of the first k slices (k = 1..4: 2/4/6/8 bits), each with the
linears' inputs as they are and with them rounded the way the int8-activation option of the batch-1 decode kernel
(``sliced_gemv_cc(..., x_int8=)``, kernels/act_int8.py) rounds them: per token and group of g in-features,
amax = max |x| (at least 1e-30), q = floor(x 127 / amax + 1/2) clamped to [-127, 127], x_hat = q amax / 127. g is
the weights' group size of each linear (``config.group_size_for(in_features)``), as in the kernel.
Why: that option changes the numerics (the weights stay exact, x does not); this says how much it costs in quality,
before it is worth making a default. The rounding is emulated in torch by forward pre-hooks on the linears the
library quantizes (``target_linears``), removed afterwards; everything else is the protocol of
benchmarks/elastic_ppl.py (mobiquant.evaluate, non-overlapping windows).

    python benchmarks/experiments/int8_act_ppl.py [--windows 16] [--seqlen 1024] [--group-size 64]

(no --group-size: the library's default, the largest of 128/64/32 dividing each linear's in_features.) Prints a
table and writes benchmarks/results/int8_act_ppl_cpu.json.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import mobiquant
from mobiquant.api import quantized_linears, target_linears
from mobiquant.evaluate import run_methods

spec = importlib.util.spec_from_file_location("cpu_ppl", Path(__file__).with_name("_cpu_ppl.py"))
CP = importlib.util.module_from_spec(spec)
spec.loader.exec_module(CP)
QMAX = 127  # kernels/act_int8.py
TINY = 1e-30


def int8_round(x: torch.Tensor, g: int) -> torch.Tensor:
    """x (..., K) -> x_hat (..., K), x rounded to int8 per token and group of g features (kernels/act_int8.py)."""
    K = x.shape[-1]
    xg = x.float().reshape(-1, K // g, g)  # (M, G, g)
    amax = xg.abs().amax(-1, keepdim=True).clamp_min(TINY)  # (M, G, 1)
    q = torch.floor(xg * (QMAX / amax) + 0.5).clamp(-QMAX, QMAX)
    return (q * (amax / QMAX)).reshape(x.shape).to(x.dtype)  # sx = amax / 127, as dequantize_x_int8


@contextlib.contextmanager
def int8_inputs(linears: dict[str, nn.Module], config: mobiquant.MoBiQuantConfig) -> Iterator[None]:
    """Inside the block, each of ``linears`` sees its input rounded by ``int8_round`` (its own group size)."""
    handles = []
    for lin in linears.values():
        g = config.group_size_for(lin.in_features)
        hook = lambda mod, args, g=g: (int8_round(args[0], g), *args[1:])
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    p = CP.parser(__doc__, "int8_act_ppl_cpu.json")
    p.add_argument("--group-size", type=int, default=None, help="default: the library's (per layer)")
    args = p.parse_args()
    t_start = time.perf_counter()
    config = mobiquant.MoBiQuantConfig(slice_bits=tuple(int(b) for b in args.slice_bits.split(",")),
                                       group_size=args.group_size)
    model, setup = CP.setup(args, config)
    fp_linears = target_linears(model, config)
    groups = {lin.in_features: config.group_size_for(lin.in_features) for lin in fp_linears.values()}
    gs = sorted(set(groups.values()))
    dtype = next(model.parameters()).dtype
    act_fp = f"fp{torch.finfo(dtype).bits}"  # the model's own activations (fp32 on the CPU)
    act_q = "int8/g" + ",".join(map(str, gs))
    bits = [float(b) for b in config.precisions]

    rows = []
    for method in ("fp", "slices"):
        for act in (act_fp, act_q):
            # the fp model's nn.Linear, or the MoBiQuantLinear that replace them (quantized_model is built once)
            linears = fp_linears if method == "fp" else quantized_linears(setup.quantized_model())
            with int8_inputs(linears, config) if act == act_q else contextlib.nullcontext():
                for r in run_methods(setup, [method], bits):
                    rows.append({"method": method, "bits": int(r.bits_realized), "act": act, "ppl": r.ppl,
                                 "seconds": r.seconds})
                    print(f"{method} {r.bits_realized:g} bits, {act}: ppl {r.ppl:.3f} ({r.seconds:.0f} s)",
                          flush=True)

    df = pd.DataFrame(rows)
    table = df.pivot(index=["method", "bits"], columns="act", values="ppl")[[act_fp, act_q]].reset_index()
    table["ratio"] = table[act_q] / table[act_fp]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    CP.write(args, model, setup, t_start, rows, group_size_arg=args.group_size,
             group_size={str(k): g for k, g in sorted(groups.items())},  # in_features -> g (weights and x)
             act_int8="per token, group of g: q = clamp(floor(x 127 / max|x| + 1/2), ±127), x_hat = q max|x| / 127",
             linears=len(fp_linears))


if __name__ == "__main__":
    main()
