"""Threshold modes against random routing at the same budget (issue #3): one checkpoint, WikiText-2 perplexity.

    python benchmarks/thresholds.py --checkpoint DIR [--windows 32] [--budgets 3.5,4.5]
                                    [--modes balanced,adaptive,layer,random]

Every mode uses the band allocation (each token at one of the two precisions around the budget); "random" draws
that choice at random (seeded). Prints a table and writes benchmarks/results/thresholds_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import mobiquant
from mobiquant.evaluate import make_windows, perplexity, read_text, tokenize_text
from mobiquant.route import attach_thresholds_
from mobiquant.trace import RoutingTrace

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2-raw-test.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", default=str(DATA))
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--budgets", default="3.5,4.5")
    p.add_argument("--modes", default="balanced,adaptive,random")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "thresholds_cpu.json"))
    args = p.parse_args()
    model, tok = mobiquant.load_quantized(args.checkpoint)
    windows = make_windows(tokenize_text(tok, read_text(args.text)), args.seqlen, args.windows)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
            "torch threads", "torch": torch.__version__, "checkpoint": args.checkpoint,
            "slice_bits": list(model.mobiquant_config.slice_bits), "windows": int(windows.shape[0]),
            "seqlen": args.seqlen, "text": Path(args.text).name, "allocation": "band"}
    rows = []
    for b in (float(x) for x in args.budgets.split(",")):
        for mode in args.modes.split(","):
            attach_thresholds_(model, "layer" if mode == "random" else mode, "band")
            trace, t0 = RoutingTrace(keep=False), time.perf_counter()
            with mobiquant.precision(budget=b, trace=trace, mode="random" if mode == "random" else "router",
                                     seed=0):
                ppl, tokens = perplexity(model, windows, progress=True, desc=f"{mode} {b:g}b")
            rows.append({"budget": b, "mode": mode, "ppl": ppl, "bits_realized": trace.realized_bits(),
                         "tokens": tokens, "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")  # row by row
    print(f"{'budget':>6} {'mode':>9} {'ppl':>9} {'bits':>6}")
    for r in rows:
        print(f"{r['budget']:>6g} {r['mode']:>9} {r['ppl']:>9.3f} {r['bits_realized']:>6.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
