"""WikiText-2 perplexity with lm_head sliced like the linears and run at a fixed count (the decode engine's
``head_slices`` option), on the CPU.

What: the perplexity of the full-precision model and of the first k slices of every quantized linear (k = 2..4:
4 / 6 / 8 bits), each with lm_head as it is and with lm_head replaced by its own first 2, 3 or 4 slices (4 / 6 / 8
bits): ``MoBiQuantLinear.from_linear(lm_head, config)``, the model's slices and the group size of its input width,
as ``DecodeEngine(head_slices=)`` builds it. lm_head is swapped for an ``nn.Linear`` holding Ŵ_k (untied from the
embedding, which keeps its weights) and put back afterwards.
Why: the option changes the numerics; lm_head is 1.05 GB of LLaMA-3-8B's fp16 weights, 0.37 ms of a 1.8 ms decode
step at budget 2 (benchmarks/experiments/head_gemv.py), so this says what that time costs in quality. Everything
else is the protocol of benchmarks/elastic_ppl.py (mobiquant.evaluate, non-overlapping windows).

    python benchmarks/experiments/head_ppl.py [--windows 16] [--seqlen 1024]

Prints a table and writes benchmarks/results/head_ppl_cpu.json.
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
from mobiquant.evaluate import run_methods
from mobiquant.nn.linear import MoBiQuantLinear

spec = importlib.util.spec_from_file_location("cpu_ppl", Path(__file__).with_name("_cpu_ppl.py"))
CP = importlib.util.module_from_spec(spec)
spec.loader.exec_module(CP)


@contextlib.contextmanager
def sliced_head(model: nn.Module, k: int | None, config: mobiquant.MoBiQuantConfig) -> Iterator[None]:
    """Inside the block, model.lm_head is an nn.Linear holding the first k slices of the original (None: as is)."""
    head = model.lm_head
    if k is not None:
        q = MoBiQuantLinear.from_linear(head, config)
        new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(q.weight_k(k))
            if head.bias is not None:
                new.bias.copy_(head.bias)
        model.lm_head = new
    try:
        yield
    finally:
        model.lm_head = head


def main() -> None:
    args = CP.parser(__doc__, "head_ppl_cpu.json").parse_args()
    t_start = time.perf_counter()
    config = mobiquant.MoBiQuantConfig(slice_bits=tuple(int(b) for b in args.slice_bits.split(",")))
    model, setup = CP.setup(args, config)
    K = model.lm_head.in_features
    head_config = mobiquant.MoBiQuantConfig(slice_bits=config.slice_bits, group_size=config.group_size_for(K))
    heads = [None] + list(range(2, len(config.slice_bits) + 1))  # None: the model's own head
    bits = [float(b) for b in config.precisions[1:]]  # 2 bits (one slice, round-to-nearest) is unusable anyway

    rows = []
    for method in ("fp", "slices"):
        target = model if method == "fp" else setup.quantized_model()
        for k in heads:
            head_bits = "full" if k is None else str(config.precisions[k - 1])
            with sliced_head(target, k, head_config):
                for r in run_methods(setup, [method], bits):
                    rows.append({"method": method, "bits": int(r.bits_realized), "head_bits": head_bits,
                                 "ppl": r.ppl, "seconds": r.seconds})
                    print(f"{method} {r.bits_realized:g} bits, head {head_bits}: ppl {r.ppl:.3f} ({r.seconds:.0f} s)",
                          flush=True)

    df = pd.DataFrame(rows)
    table = df.pivot(index=["method", "bits"], columns="head_bits", values="ppl").reset_index()
    for c in [c for c in table.columns if c not in ("method", "bits", "full")]:
        table[f"ratio_{c}"] = table[c] / table["full"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    CP.write(args, model, setup, t_start, rows, head_shape=list(model.lm_head.weight.shape),
             head_group_size=head_config.group_size,
             head="MoBiQuantLinear.from_linear(lm_head) (round-to-nearest slices, no calibration), first k slices")


if __name__ == "__main__":
    main()
