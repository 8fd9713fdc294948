"""``mobiquant`` command line (also ``python -m mobiquant``).

    mobiquant eval [--model NAME | --checkpoint DIR] --text FILE [--seqlen 1024] [--windows N] [--bits 2,4,6,8]
                   [--methods fp,rtn,slices] [--slice-bits 2,2,2,2] [--group-size G] [--json OUT]
    mobiquant quantize [--model NAME] --out DIR [--slice-bits 2,2,2,2] [--group-size G]

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
    ev.add_argument("--bits", type=_floats, default=[2.0, 4.0, 6.0, 8.0], help="widths, e.g. 2,4,6,8")
    ev.add_argument("--methods", type=_names, default=["fp", "rtn", "slices"], help="comma-separated, e.g. fp,rtn")
    ev.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    ev.add_argument("--no-progress", action="store_true")
    _add_quant_args(ev)

    qz = sub.add_parser("quantize", help="slice a model and save a checkpoint")
    qz.add_argument("--model", default="default")
    qz.add_argument("--out", required=True)
    _add_quant_args(qz)
    return parser


def cmd_eval(args) -> int:
    from .evaluate import (
        EvalSetup,
        check_methods,
        check_windows,
        format_table,
        make_windows,
        read_text,
        run_methods,
        tokenize_text,
    )
    from .io import load_quantized
    from .models import load_model

    # cheap checks first: a bad file, window or method fails before a model is loaded
    text = read_text(args.text)
    check_windows(args.seqlen, args.windows)
    if not args.checkpoint:
        check_methods(_config(args), args.methods, args.bits)
    if args.checkpoint:
        model, tokenizer = load_quantized(args.checkpoint)
        config = model.mobiquant_config
        source = model.config.mobiquant_source
        load_fp = (lambda: load_model(source)[0]) if source else None
        load_q = lambda: model  # noqa: E731
    else:
        config = _config(args)
        model, tokenizer = load_model(args.model or "default")
        load_fp, load_q = (lambda: model), None
    if tokenizer is None:
        raise MoBiQuantError("no tokenizer found with the model")
    windows = make_windows(tokenize_text(tokenizer, text), args.seqlen, args.windows)
    setup = EvalSetup(windows, config, load_fp=load_fp, load_quantized=load_q, progress=not args.no_progress)
    rows = []
    for row in run_methods(setup, args.methods, args.bits):
        rows.append(row)
        print(f"{row.method:>8} bits={row.bits_requested} ppl={row.ppl:.3f} ({row.seconds:.1f} s)", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"eval": cmd_eval, "quantize": cmd_quantize}[args.command](args)
    except MoBiQuantError as e:
        print(f"mobiquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobiquant: interrupted", file=sys.stderr)
        return 130
