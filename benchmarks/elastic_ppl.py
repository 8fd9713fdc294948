"""Elastic perplexity and CPU speed of one sliced checkpoint (issue #2).

Quality: WikiText-2 perplexity (non-overlapping windows) of the full-precision model, RTN at 2/4/6/8 bits and the
first k slices (2/4/6/8 bits), same group size; plus RTN 4-bit with group 32, which reproduces the embedded model's
own Q4_1 weights (a sanity check of the pipeline, not a result).
Speed: one-token decode (KV cache, greedy) tokens/s and a 1024-token prefill, for the unquantized model, each uniform
k, and mixed per-token k; the memory each strategy costs.

    python benchmarks/elastic_ppl.py [--windows 32] [--seqlen 1024] [--group-size 64]

Prints tables and writes benchmarks/results/elastic_ppl_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

import mobiquant
from mobiquant.api import target_linears
from mobiquant.evaluate import EvalSetup, make_windows, read_text, run_methods, tokenize_text
from mobiquant.nn.linear import MoBiQuantLinear

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-raw-test.txt"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@torch.no_grad()
def decode_tok_s(model, prompt: torch.Tensor, steps: int, k_of_step=None) -> float:
    """Greedy one-token decode with the HF KV cache; k_of_step(i) -> k for step i (None: whatever is active)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for i in range(steps):
        if k_of_step is None:
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        else:
            with mobiquant.precision(k=k_of_step(i)):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def prefill_s(model, ids: torch.Tensor, k=None) -> float:
    t0 = time.perf_counter()
    if k is None:
        model(input_ids=ids)
    else:
        with mobiquant.precision(k=k):
            model(input_ids=ids)
    return time.perf_counter() - t0


def quality(args, model, tok, config) -> list[dict]:
    windows = make_windows(tokenize_text(tok, read_text(args.text)), args.seqlen, args.windows)
    setup = EvalSetup(windows, config, load_fp=lambda: model)
    rows = [r.to_dict() | {"group_size": args.group_size} for r in
            run_methods(setup, ["fp", "rtn", "slices"], [float(b) for b in config.precisions])]
    q41 = EvalSetup(windows, mobiquant.MoBiQuantConfig(group_size=32), load_fp=lambda: model)
    rows += [r.to_dict() | {"method": "rtn (g32 = Q4_1)", "group_size": 32} for r in run_methods(q41, ["rtn"], [4.0])]
    return rows


def speed(args, model, tok, config) -> tuple[list[dict], dict]:
    ids = tokenize_text(tok, read_text(args.text))
    prompt, long = ids[None, :32], ids[None, 1000:1000 + args.seqlen]
    qmodel = mobiquant.quantize_(copy.deepcopy(model), config)
    linears = [m for m in qmodel.modules() if isinstance(m, MoBiQuantLinear)]
    E = config.num_slices
    gen = torch.Generator().manual_seed(0)
    mixed_steps = torch.randint(1, E + 1, (args.decode_steps,), generator=gen)
    mixed_tokens = torch.randint(1, E + 1, long.shape, generator=gen)
    cases = [("unquantized", model, None, None)]
    cases += [(f"k={k} ({config.precisions[k - 1]} bits)", qmodel, (lambda i, k=k: k), k) for k in range(1, E + 1)]
    cases += [("mixed k (random per token)", qmodel, lambda i: torch.full((1, 1), int(mixed_steps[i])), mixed_tokens)]
    # warm-up: builds every dense cache before timing
    for _, m, kfn, kp in cases:
        decode_tok_s(m, prompt, 2, kfn)
        prefill_s(m, long[:, :64], kp if not isinstance(kp, torch.Tensor) else kp[:, :64])
    # interleaved rounds (every case once per round, median over rounds): a slow spell of the machine hits all
    # cases alike instead of whichever happened to run then
    tps = {name: [] for name, *_ in cases}
    pre = {name: [] for name, *_ in cases}
    for _ in range(args.repeats):
        for name, m, kfn, kp in cases:
            tps[name].append(decode_tok_s(m, prompt, args.decode_steps, kfn))
            pre[name].append(prefill_s(m, long, kp))
    rows = [{"case": name, "decode_tok_s": statistics.median(tps[name]), "prefill_s": statistics.median(pre[name])}
            for name, *_ in cases]
    base = rows[0]
    for r in rows:
        r["decode_vs_unquantized"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_unquantized"] = base["prefill_s"] / r["prefill_s"]
    # the reference (no-cache) path, for mixed k: what the memory-light torch path costs
    mobiquant.set_dense_cache_(qmodel, False)
    tps = statistics.median(decode_tok_s(qmodel, prompt, args.decode_steps // 2,
                                         lambda i: torch.full((1, 1), int(mixed_steps[i]))) for _ in range(2))
    rows.append({"case": "mixed k, reference slice path (no cache)", "decode_tok_s": tps,
                 "prefill_s": prefill_s(qmodel, long, mixed_tokens),
                 "decode_vs_unquantized": tps / base["decode_tok_s"]})
    rows[-1]["prefill_vs_unquantized"] = base["prefill_s"] / rows[-1]["prefill_s"]
    mobiquant.set_dense_cache_(qmodel, True)
    for k in range(1, E + 1):  # rebuild all caches to measure their size
        with mobiquant.precision(k=k), torch.no_grad():
            qmodel(input_ids=prompt)
    fp_bytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in target_linears(model, config).values())
    memory = {
        "decoder_linears_fp32_MiB": fp_bytes / 2**20,
        "sliced_storage_MiB": sum(sum(b.numel() * b.element_size() for b in m.buffers()) for m in linears) / 2**20,
        "dense_cache_all_k_MiB": sum(m.dense_cache_bytes() for m in linears) / 2**20,
        "storage_bits_per_weight": statistics.fmean(m.bits_per_weight() for m in linears),
        "process_rss_MiB": rss_mib(),
    }
    return rows, memory


def markdown(rows: list[dict], cols: list[str]) -> str:
    """A GitHub table of ``cols`` (floats with 3 decimals), for the README."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--slice-bits", default="2,2,2,2")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-quality", action="store_true", help="time only; keep the quality rows of an existing --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "elastic_ppl_cpu.json"))
    args = p.parse_args()
    config = mobiquant.MoBiQuantConfig(slice_bits=tuple(int(b) for b in args.slice_bits.split(",")),
                                       group_size=args.group_size)
    model, tok = mobiquant.load_model(args.model)
    result = {
        "meta": {
            "model": args.model, "text": Path(args.text).name, "windows": args.windows, "seqlen": args.seqlen,
            "group_size": args.group_size, "slice_bits": list(config.slice_bits),
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "mobiquant": mobiquant.__version__,
            "protocol": "file text as is, tokenized without special tokens, non-overlapping windows, mean NLL",
        }
    }
    if args.skip_quality and Path(args.out).is_file():  # re-time only: keep the quality rows already measured
        result["quality"] = json.loads(Path(args.out).read_text()).get("quality", [])
    else:
        result["quality"] = quality(args, model, tok, config)
        print(pd.DataFrame(result["quality"]).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    result["speed"], result["memory"] = speed(args, model, tok, config)
    print(pd.DataFrame(result["speed"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(json.dumps(result["memory"], indent=2))
    print(markdown(result["quality"], ["method", "bits_requested", "group_size", "ppl", "seconds"]))
    print(markdown(result["speed"], ["case", "decode_tok_s", "decode_vs_unquantized", "prefill_s",
                                     "prefill_vs_unquantized"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
