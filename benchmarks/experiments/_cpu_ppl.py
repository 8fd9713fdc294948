"""Shared by this folder's CPU perplexity experiments (int8_act_ppl.py, head_ppl.py): their arguments, the embedded
model and WikiText-2 windows in benchmarks/elastic_ppl.py's protocol (mobiquant.evaluate), and the JSON they write."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

import mobiquant
from mobiquant.evaluate import EvalSetup, make_windows, read_text, tokenize_text

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-raw-test.txt"


def parser(doc: str, out_name: str) -> argparse.ArgumentParser:
    """--model, --text, --windows, --seqlen, --slice-bits and --out (default benchmarks/results/<out_name>)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--slice-bits", default="2,2,2,2")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out_name))
    return p


def setup(args, config: mobiquant.MoBiQuantConfig):
    """(model, EvalSetup over the text's windows): the full-precision model is ``model`` itself."""
    model, tok = mobiquant.load_model(args.model)
    windows = make_windows(tokenize_text(tok, read_text(args.text)), args.seqlen, args.windows)  # (n, seqlen)
    return model, EvalSetup(windows, config, load_fp=lambda: model, progress=False)


def write(args, model, ev: EvalSetup, t_start: float, rows: list[dict], **meta) -> None:
    """The rows and the run's facts (date, versions, machine, model, text, windows, slices, ``meta``) to --out."""
    dtype = next(model.parameters()).dtype
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} cores",
            "model": args.model, "dtype": str(dtype).removeprefix("torch."), "text": Path(args.text).name,
            "windows": int(ev.windows.shape[0]), "seqlen": args.seqlen, "tokens": ev.windows.numel(),
            "slice_bits": list(ev.config.slice_bits), **meta, "seconds": time.perf_counter() - t_start,
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
