"""``mobiquant`` command line (also ``python -m mobiquant``).

    mobiquant eval [--model NAME | --checkpoint DIR] --text FILE [--seqlen 1024] [--windows N]
                   [--budgets 2,4,6,8 (alias --bits)] [--methods fp,rtn,slices] [--slice-bits 2,2,2,2]
                   [--group-size G] [--json OUT]
    mobiquant quantize [--model NAME] --out DIR [--slice-bits 2,2,2,2] [--group-size G]
    mobiquant calibrate [--model NAME] --out DIR [--calib self|FILE|dataset:NAME] [--samples N] [--seqlen L]
                   [--epochs E] [--fast] [--slice-bits ...] [--group-size G]
    mobiquant outliers --checkpoint DIR --text FILE [--linear NAME ...] [--tokens 512] [--budgets 4]
    mobiquant app [--model NAME | --checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--slice-bits ...]

User errors print one line (``mobiquant: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import MoBiQuantConfig
from .errors import MoBiQuantError


def _floats(s: str) -> list[float]:
    try:
        out = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(v != v or v in (float("inf"), float("-inf")) for v in out):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {s!r}")
    return out


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _config(args) -> MoBiQuantConfig:
    return MoBiQuantConfig(slice_bits=args.slice_bits, group_size=args.group_size)


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice-bits", type=_ints, default=(2, 2, 2, 2), help="bits of each slice (default 2,2,2,2)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale/zero point (default: largest of 128/64/32 dividing each layer's width)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobiquant", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of full-precision, RTN and sliced models on a text file")
    src = ev.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="'default' (embedded SmolLM2-135M), a directory, a .gguf or Hub id")
    src.add_argument("--checkpoint", default=None, help="a directory written by `mobiquant quantize`")
    ev.add_argument("--text", required=True, help="UTF-8 text file (e.g. WikiText-2 raw test)")
    ev.add_argument("--seqlen", type=int, default=1024)
    ev.add_argument("--windows", type=int, default=None, help="evaluate the first N windows (default: all)")
    ev.add_argument("--budgets", "--bits", dest="bits", type=_floats, default=[2.0, 4.0, 6.0, 8.0],
                    help="average bits (uniform widths for fp/rtn/slices/bitspecific), e.g. 2.5,3,4")
    ev.add_argument("--methods", type=_names, default=["fp", "rtn", "slices"], help="comma-separated, e.g. fp,rtn")
    ev.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    ev.add_argument("--no-progress", action="store_true")
    _add_quant_args(ev)

    qz = sub.add_parser("quantize", help="slice a model (no calibration) and save a checkpoint")
    qz.add_argument("--model", default="default")
    qz.add_argument("--out", required=True)
    _add_quant_args(qz)

    ca = sub.add_parser("calibrate", help="calibrate clipping and routers block by block; save a checkpoint")
    ca.add_argument("--model", default="default")
    ca.add_argument("--out", required=True)
    ca.add_argument("--calib", default="self", help="'self' (sampled from the model), a text file, or dataset:NAME")
    ca.add_argument("--samples", type=int, default=None)
    ca.add_argument("--seqlen", type=int, default=None)
    ca.add_argument("--epochs", type=int, default=None, help="epochs per stage")
    ca.add_argument("--fast", action="store_true", help="the quick recipe the app runs on first launch")
    ca.add_argument("--next-input", choices=["quantized", "fp"], default=None)
    ca.add_argument("--thresholds", choices=["layer", "global", "adaptive", "balanced"], default=None,
                    help="default: balanced (fisher and band allocations), layer (nested)")
    ca.add_argument("--allocation", choices=["fisher", "band", "nested"], default="fisher",
                    help="fisher: each linear's share of the budget from its cost curve (default); band: every "
                         "linear at the budget; nested: any slice count")
    ca.add_argument("--seed", type=int, default=0)
    _add_quant_args(ca)

    ou = sub.add_parser("outliers", help="outlier migration: per-token errors across precisions for some linears")
    ou.add_argument("--checkpoint", required=True)
    ou.add_argument("--text", required=True)
    ou.add_argument("--linear", action="append", default=None, help="module name (repeatable); default: three")
    ou.add_argument("--tokens", type=int, default=512)
    ou.add_argument("--budgets", type=_floats, default=[], help="routed budgets to include, e.g. 3,4")
    ou.add_argument("--json", default=None)

    ap = sub.add_parser("app", help="the playground (Gradio): live bit budget, slice-coloured tokens, outliers")
    ap.add_argument("--model", default="default", help="calibrated with --fast on first run, then cached")
    ap.add_argument("--checkpoint", default=None, help="a calibrated checkpoint directory (instead of --model)")
    ap.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="server-side cap per request")
    ap.add_argument("--concurrency", type=int, default=2, help="generations running at once")
    _add_quant_args(ap)
    return parser


def cmd_eval(args) -> int:
    from .evaluate import (
        EvalSetup,
        check_windows,
        format_table,
        make_windows,
        plan_methods,
        read_text,
        run_methods,
        tokenize_text,
    )
    from .io import load_quantized
    from .models import load_model

    # cheap checks first: a bad file, window, method or width fails before a model is loaded
    text = read_text(args.text)
    check_windows(args.seqlen, args.windows)
    if args.checkpoint:
        model, tokenizer = load_quantized(args.checkpoint)
        config = model.mobiquant_config
        plan_methods(config, args.methods, args.bits)
        source = model.config.mobiquant_source
        load_fp = (lambda: load_model(source)[0]) if source else None
        load_q = lambda: model  # noqa: E731
        calib = (model.mobiquant_calibration or {}).get("calib")
    else:
        config = _config(args)
        plan_methods(config, args.methods, args.bits)
        model, tokenizer = load_model(args.model or "default")
        load_fp, load_q, calib = (lambda: model), None, None
    if tokenizer is None:
        raise MoBiQuantError("no tokenizer found with the model")
    windows = make_windows(tokenize_text(tokenizer, text), args.seqlen, args.windows)
    setup = EvalSetup(windows, config, load_fp=load_fp, load_quantized=load_q, tokenizer=tokenizer, calib=calib,
                      progress=not args.no_progress)
    rows = []
    for row in run_methods(setup, args.methods, args.bits):
        rows.append(row)
        print(f"{row.method:>11} bits={row.bits_requested} realized={row.bits_realized} ppl={row.ppl:.3f} "
              f"({row.seconds:.1f} s)", file=sys.stderr)
    print(format_table(rows))
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return 0


def cmd_quantize(args) -> int:
    from .api import quantize_
    from .io import save_quantized
    from .models import load_model

    config = _config(args)
    model, tokenizer = load_model(args.model)
    quantize_(model, config, progress=True)
    out = save_quantized(model, args.out, tokenizer)
    print(f"saved {out}")
    return 0


def cmd_calibrate(args) -> int:
    import dataclasses

    from .calibrate import CalibConfig, calibrate_
    from .io import save_quantized
    from .models import load_model

    thresholds = args.thresholds or ("layer" if args.allocation == "nested" else "balanced")
    config = dataclasses.replace(_config(args), thresholds=thresholds, allocation=args.allocation)
    overrides = {k: v for k, v in {"calib": args.calib, "samples": args.samples, "seqlen": args.seqlen,
                                   "epochs": args.epochs, "next_input": args.next_input, "seed": args.seed}.items()
                 if v is not None}
    calib = CalibConfig.fast(**overrides) if args.fast else CalibConfig(**overrides)
    if calib.calib not in ("self",) and not calib.calib.startswith("dataset:") and not Path(calib.calib).is_file():
        raise MoBiQuantError(f"no such calibration text file: {calib.calib}")
    model, tokenizer = load_model(args.model)
    calibrate_(model, tokenizer, config, calib)
    out = save_quantized(model, args.out, tokenizer)
    print(f"calibrated in {model.mobiquant_calibration['seconds']:.0f} s; saved {out}")
    return 0


def cmd_outliers(args) -> int:
    import torch

    from .analysis import outlier_migration
    from .api import quantized_linears
    from .evaluate import read_text, tokenize_text
    from .io import load_quantized
    from .models import load_model

    text = read_text(args.text)
    model, tokenizer = load_quantized(args.checkpoint)
    source = model.config.mobiquant_source
    if not source:
        raise MoBiQuantError("the checkpoint does not record its source model (needed for the FP weights)")
    fp, _ = load_model(source)
    names = list(quantized_linears(model))
    n_layers = 1 + max(int(n.split(".layers.")[1].split(".")[0]) for n in names)
    chosen = args.linear or [n for n in names if any(n.endswith(f"layers.{i}.{leaf}") for i, leaf in
                                                     [(1, "self_attn.q_proj"), (n_layers // 2, "self_attn.o_proj"),
                                                      (n_layers - 2, "mlp.down_proj")])]
    ids = tokenize_text(tokenizer, text)[: args.tokens]
    out = []
    for name in chosen:
        try:
            weight = fp.get_submodule(name).weight.detach()
        except AttributeError:
            raise MoBiQuantError(f"no linear {name!r} in the model") from None
        rep = outlier_migration(model, name, ids, weight, tuple(args.budgets))
        print(f"\n{name}: top-10% token overlap (Jaccard) across precisions, {len(ids)} tokens")
        print(rep.table())
        out.append({"linear": name, "labels": rep.labels, "jaccard": rep.jaccard.tolist(),
                    "absmax_top": torch.topk(rep.absmax, 5).indices.tolist()})
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_app(args) -> int:
    import torch

    try:
        from .app import Limits, load_served, serve
    except ImportError as e:  # gradio / plotly are the [app] extra
        raise MoBiQuantError(f"the playground needs the app extra: pip install 'mobiquant[app]' ({e})") from e
    if not 1 <= args.port <= 65535:
        raise MoBiQuantError(f"--port must be 1..65535, got {args.port}")
    if args.max_new_tokens < 1 or args.concurrency < 1:
        raise MoBiQuantError("--max-new-tokens and --concurrency must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    served = load_served(args.model, args.checkpoint, _config(args), device=device)
    limits = Limits(max_new_tokens=args.max_new_tokens, concurrency=args.concurrency)
    print(f"mobiquant app: serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    serve(served, args.host, args.port, limits)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"eval": cmd_eval, "quantize": cmd_quantize, "calibrate": cmd_calibrate, "outliers": cmd_outliers,
                    "app": cmd_app}
        return commands[args.command](args)
    except MoBiQuantError as e:
        print(f"mobiquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobiquant: interrupted", file=sys.stderr)
        return 130
