"""The elastic curve (issue #3): perplexity against realized bits for every method, from one calibration.

For each slice list (default: the paper's 2,2,2,2 and the finer 3,1,1,1,1,1) the embedded model is calibrated once
(`calibrate_`, timed), then evaluated on WikiText-2 (non-overlapping windows) with

    mobiquant    routed at each budget          random   random nested routing, same budget
    slices       uniform k (budgets = some B_k)  bitspecific  the clipping calibration rerun at each integer width
    rtn          round-to-nearest, min/max endpoints

plus other threshold:allocation pairs (``--alternatives``; default the uniform band, balanced) and the
outlier-migration overlap of three linears.

    python benchmarks/elastic_curve.py [--windows 32] [--slice-lists 2,2,2,2 3,1,1,1,1,1] [--fast]
    python benchmarks/elastic_curve.py --plot-only      # redraw the plot from the JSON

Writes benchmarks/results/elastic_curve_cpu.json (``--device cuda``: elastic_curve_cuda.json), assets/elastic_curve.html
and assets/elastic_curve.png. Perplexity does not depend on the device beyond float rounding; calibration seconds do,
so the JSON records where it ran. ``--model`` takes a .gguf path (the embedded file copied to a GPU host that cannot
install the package) and ``--source-name default`` keeps the calibration-data cache keys of the embedded model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import mobiquant
from mobiquant.analysis import outlier_migration
from mobiquant.calibrate import CalibConfig, calibrate_
from mobiquant.calibrate.data import cache_dir
from mobiquant.evaluate import EvalSetup, make_windows, read_text, run_methods, tokenize_text
from mobiquant.route import attach_thresholds_

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-raw-test.txt"
LINEARS = ["model.layers.1.self_attn.q_proj", "model.layers.15.self_attn.o_proj", "model.layers.28.mlp.down_proj"]


def calibrated(fp, tok, slice_bits, group_size, calib: CalibConfig, reuse: bool):
    config = mobiquant.MoBiQuantConfig(slice_bits=slice_bits, group_size=group_size)
    key = (f"curve-{'-'.join(map(str, slice_bits))}-g{group_size}-{calib.samples}x{calib.seqlen}-e{calib.epochs}-"
           f"{config.allocation}")
    changed = {f.name: getattr(calib, f.name) for f in dataclasses.fields(calib)
               if getattr(calib, f.name) != getattr(CalibConfig(), f.name) and f.name not in ("samples", "seqlen",
                                                                                             "epochs")}
    if changed:  # a variant recipe gets its own checkpoint
        key += "-" + "-".join(f"{k}={v}" for k, v in sorted(changed.items()))
    path = cache_dir() / "checkpoints" / key
    if reuse and (path / "mobiquant_config.json").is_file():
        model, _ = mobiquant.load_quantized(path, device=next(fp.parameters()).device)
        return model, model.mobiquant_calibration["seconds"], str(path)
    model = calibrate_(copy.deepcopy(fp), tok, config, calib)
    mobiquant.save_quantized(model, path, tok)
    return model, model.mobiquant_calibration["seconds"], str(path)


def plot(rows: list[dict], out_html: Path, out_png: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for (sb, method), group in _groups(rows).items():
        group = sorted(group, key=lambda r: r["bits_realized"])
        fig.add_trace(go.Scatter(x=[r["bits_realized"] for r in group], y=[r["ppl"] for r in group],
                                 mode="lines+markers", name=f"{method} ({sb})"))
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    if fp:  # a trace, not add_hline: its annotation would be placed in log units on a log axis
        bits = [r["bits_realized"] for r in rows if r["method"] != "fp"]
        fig.add_trace(go.Scatter(x=[min(bits), max(bits)], y=[fp, fp], mode="lines", name=f"full precision {fp:.2f}",
                                 line=dict(dash="dot", color="black")))
    fig.update_layout(title="SmolLM2-135M, WikiText-2: perplexity vs realized bits (one calibration per slice list)",
                      xaxis_title="realized average bits per weight", yaxis_title="perplexity (log)",
                      yaxis_type="log", template="plotly_white", width=900, height=560)
    ppl = [r["ppl"] for r in rows if math.isfinite(r["ppl"])]
    fig.update_yaxes(range=[math.log10(min(ppl) * 0.9), math.log10(min(max(ppl), 1e4) * 1.1)])
    fig.write_html(out_html, include_plotlyjs="cdn")
    try:
        fig.write_image(out_png)
    except Exception as e:  # kaleido needs a Chrome; the HTML is the primary artifact
        print(f"PNG not written ({type(e).__name__}: {e})")


def _groups(rows):
    out = {}
    for r in rows:
        if r["method"] != "fp":
            out.setdefault((r.get("slice_bits", "-"), r["method"]), []).append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--slice-lists", nargs="+", default=["2,2,2,2", "3,1,1,1,1,1"])
    p.add_argument("--budgets", default="2,2.5,3,3.5,4,5,6,8")
    p.add_argument("--methods", default="mobiquant,random,slices,bitspecific,rtn")
    p.add_argument("--alternatives", default="balanced:band",
                   help="other threshold:allocation pairs to evaluate at every budget (e.g. balanced:band,layer:band)")
    p.add_argument("--alternative-budgets", help="budgets for --alternatives (default: --budgets)")
    p.add_argument("--fast", action="store_true", help="calibrate with the --fast recipe")
    p.add_argument("--calib-options", type=json.loads, default={},
                   help='CalibConfig fields to change, as JSON, e.g. \'{"balance_budgets": true}\'')
    p.add_argument("--reuse", action="store_true", help="reuse calibrated checkpoints from the cache")
    p.add_argument("--model", default="default")
    p.add_argument("--source-name", help="the model's name in cache keys (default: --model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot from --out")
    args = p.parse_args()
    device = torch.device(args.device)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"elastic_curve_{device.type}.json")
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text())["rows"], ROOT / "assets" / "elastic_curve.html",
             ROOT / "assets" / "elastic_curve.png")
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    alt_budgets = [float(b) for b in (args.alternative_budgets or args.budgets).split(",")]
    fp, tok = mobiquant.load_model(args.model, device=device)
    if args.source_name:
        fp.config.mobiquant_source = args.source_name
    windows = make_windows(tokenize_text(tok, read_text(args.text)), args.seqlen, args.windows)
    calib = CalibConfig.fast(**args.calib_options) if args.fast else CalibConfig(**args.calib_options)
    result = {"meta": {
        "model": "default (SmolLM2-135M-Instruct Q4_1 GGUF)", "windows": args.windows, "seqlen": args.seqlen,
        "group_size": args.group_size, "calibration": dataclasses.asdict(calib), "budgets": budgets,
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "mobiquant": mobiquant.__version__}, "rows": [], "calibration_seconds": {},
        "threshold_modes": [], "outliers": []}
    fp_rows = list(run_methods(EvalSetup(windows, mobiquant.MoBiQuantConfig(group_size=args.group_size),
                                         load_fp=lambda: fp), ["fp"], [16.0]))
    result["rows"] += [r.to_dict() for r in fp_rows]
    methods = args.methods.split(",")
    for sl in args.slice_lists:
        slice_bits = tuple(int(b) for b in sl.split(","))
        model, seconds, path = calibrated(fp, tok, slice_bits, args.group_size, calib, args.reuse)
        result["calibration_seconds"][sl] = seconds
        print(f"slices {sl}: calibrated in {seconds:.0f} s ({path})", flush=True)
        setup = EvalSetup(windows, model.mobiquant_config, load_fp=lambda: fp, load_quantized=lambda m=model: m,
                          tokenizer=tok, calib=calib)
        for row in run_methods(setup, methods, budgets):
            d = row.to_dict() | {"slice_bits": sl}
            result["rows"].append(d)
            print(json.dumps(d), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        low, high = model.mobiquant_config.precisions[0], model.mobiquant_config.precisions[-1]
        own = (model.mobiquant_config.thresholds, model.mobiquant_config.allocation)
        for mode, allocation in [tuple(a.split(":")) for a in args.alternatives.split(",") if a]:
            if (mode, allocation) == own:
                continue
            attach_thresholds_(model, mode, allocation)
            for b in [b for b in alt_budgets if low <= b <= high]:
                ppl, realized, tokens, sec = setup.routed_ppl(b, "router", f"{mode}/{allocation} {b:g}b")
                result["threshold_modes"].append({"slice_bits": sl, "mode": mode, "allocation": allocation,
                                                  "bits_requested": b, "bits_realized": realized, "ppl": ppl})
                print(json.dumps(result["threshold_modes"][-1]), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        attach_thresholds_(model, model.mobiquant_config.thresholds, model.mobiquant_config.allocation)
        ids = windows[0]
        for name in LINEARS:
            rep = outlier_migration(model, name, ids, fp.get_submodule(name).weight.detach(), budgets=(4.0,))
            print(f"{sl} {name}\n{rep.table()}", flush=True)
            result["outliers"].append({"slice_bits": sl, "linear": name, "labels": rep.labels,
                                       "jaccard": rep.jaccard.tolist()})
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result["rows"], ROOT / "assets" / "elastic_curve.html", ROOT / "assets" / "elastic_curve.png")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
