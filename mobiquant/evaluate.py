"""Perplexity on non-overlapping windows, and the evaluation methods of ``mobiquant eval``.

Protocol: the text file is read as is (its lines joined by their own newlines), tokenized once without special
tokens, cut into consecutive windows of ``seqlen`` tokens (the tail that does not fill a window is dropped), and the
mean next-token negative log-likelihood over every predicted token gives ppl = exp(mean NLL).

Methods are registered by name (``@register_method``) and yield ``EvalRow``s, one per requested budget (average
bits) they can run; a method skips a budget it cannot run (``slices`` at 3 bits of (2, 2, 2, 2)) with a note, and
fails only when it can run none of them.

    fp           the full-precision model
    rtn          round-to-nearest with min/max endpoints, integer widths 2..8, same group size
    slices       the first k slices of the checkpoint, for budgets equal to some B_k
    mobiquant    the calibrated checkpoint, routed at the budget (realized bits measured by a RoutingTrace)
    random       the same checkpoint with random nested routing at the same average bits
    bitspecific  the checkpoint's clipping calibration run separately at each integer width (cached on disk)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .api import quantize_, target_linears
from .config import MoBiQuantConfig
from .errors import MoBiQuantError
from .precision import check_budget, precision
from .quant.rtn import rtn_quantize
from .trace import RoutingTrace


@dataclass
class EvalRow:
    method: str
    bits_requested: float | None
    bits_realized: float | None
    ppl: float
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ data
def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MoBiQuantError(f"no such text file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoBiQuantError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise MoBiQuantError(f"text file {path} is empty")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """(T,) LongTensor of the whole text, no special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def check_windows(seqlen: int, windows: int | None) -> None:
    if seqlen < 2:
        raise MoBiQuantError(f"seqlen must be at least 2, got {seqlen}")
    if windows is not None and windows < 1:
        raise MoBiQuantError(f"windows must be at least 1, got {windows}")


def make_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows; a clear error if the text is shorter than one window."""
    check_windows(seqlen, windows)
    n = ids.numel() // seqlen
    if n == 0:
        raise MoBiQuantError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if windows is not None:
        n = min(n, windows)
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False, desc: str = "ppl") -> tuple[float, int]:
    """exp(mean NLL) over every predicted token of ``windows`` (n, T); returns (ppl, tokens in the windows)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False, unit="win"):
        w = w[None].to(device)  # (1, T)
        logits = model(input_ids=w).logits[0, :-1].float()  # (T-1, vocab)
        nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return math.exp(nll / count), windows.numel()


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class EvalSetup:
    """What the methods share: the models (built lazily, at most once each) and the evaluation windows."""

    windows: torch.Tensor
    config: MoBiQuantConfig
    load_fp: Callable[[], nn.Module] | None = None  # the full-precision model, if there is one
    load_quantized: Callable[[], nn.Module] | None = None  # a saved checkpoint; else quantize_(copy of fp)
    tokenizer: object | None = None  # bitspecific calibrates: it needs the tokenizer and the recipe
    calib: object | None = None  # CalibConfig of the checkpoint (bitspecific repeats it at each width)
    progress: bool = True
    _cache: dict = field(default_factory=dict)

    def fp_model(self) -> nn.Module:
        if "fp" not in self._cache:
            if self.load_fp is None:
                raise MoBiQuantError("this method needs the full-precision model: pass --model")
            self._cache["fp"] = self.load_fp()
        return self._cache["fp"]

    def quantized_model(self) -> nn.Module:
        if "q" not in self._cache:
            if self.load_quantized is not None:
                self._cache["q"] = self.load_quantized()
            else:
                self._cache["q"] = quantize_(copy.deepcopy(self.fp_model()), self.config, progress=self.progress)
        return self._cache["q"]

    def ppl(self, model: nn.Module, desc: str) -> tuple[float, int, float]:
        t0 = time.perf_counter()
        ppl, tokens = perplexity(model, self.windows, progress=self.progress, desc=desc)
        return ppl, tokens, time.perf_counter() - t0

    def routed_ppl(self, budget: float, mode: str, desc: str) -> tuple[float, float, int, float]:
        """(ppl, realized bits, tokens, seconds) of the checkpoint at a budget."""
        trace = RoutingTrace(keep=False)
        with precision(budget=budget, mode=mode, trace=trace, seed=0):
            ppl, tokens, sec = self.ppl(self.quantized_model(), desc)
        return ppl, trace.realized_bits(), tokens, sec


Method = Callable[[EvalSetup, list[float]], Iterator[EvalRow]]
METHODS: dict[str, Method] = {}
BITS_CHECKS: dict[str, Callable[[MoBiQuantConfig, float], None]] = {}


def register_method(name: str, check_bits: Callable[[MoBiQuantConfig, float], None] | None = None):
    """Register an eval method ``fn(setup, bits) -> rows``; ``check_bits`` rejects a bad width before any work."""

    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        if check_bits is not None:
            BITS_CHECKS[name] = check_bits
        return fn

    return deco


@register_method("fp")
def _fp(setup: EvalSetup, bits: list[float]) -> Iterator[EvalRow]:
    model = setup.fp_model()
    ppl, tokens, sec = setup.ppl(model, "fp")
    width = torch.finfo(next(model.parameters()).dtype).bits
    yield EvalRow("fp", None, float(width), ppl, tokens, sec)


def _check_integer_bits(config: MoBiQuantConfig, b: float) -> None:
    if b != int(b) or not 2 <= b <= 8:
        raise MoBiQuantError(f"needs an integer width 2..8, got {b:g} bits")


@register_method("rtn", _check_integer_bits)
def _rtn(setup: EvalSetup, bits: list[float]) -> Iterator[EvalRow]:
    model = setup.fp_model()
    linears = target_linears(model, setup.config)
    originals = {n: lin.weight.data for n, lin in linears.items()}
    try:
        for b in bits:
            for n, lin in linears.items():
                g = setup.config.group_size_for(lin.in_features)
                lin.weight.data = rtn_quantize(originals[n], int(b), g).to(originals[n].dtype)
            ppl, tokens, sec = setup.ppl(model, f"rtn {b:g}b")
            yield EvalRow("rtn", b, float(b), ppl, tokens, sec)
    finally:
        for n, lin in linears.items():
            lin.weight.data = originals[n]


def _check_slice_bits(config: MoBiQuantConfig, b: float) -> None:
    config.slices_for_bits(b)


@register_method("slices", _check_slice_bits)
def _slices(setup: EvalSetup, bits: list[float]) -> Iterator[EvalRow]:
    model = setup.quantized_model()
    for b in bits:
        k = setup.config.slices_for_bits(b)
        with precision(k=k):
            ppl, tokens, sec = setup.ppl(model, f"slices k={k}")
        yield EvalRow("slices", b, float(setup.config.precisions[k - 1]), ppl, tokens, sec)


def _check_budget_range(config: MoBiQuantConfig, b: float) -> None:
    check_budget(b, config.precisions[0], config.precisions[-1])


def _routed(setup: EvalSetup) -> nn.Module:
    model = setup.quantized_model()
    if not any(getattr(m, "router", None) is not None for m in model.modules()):
        raise MoBiQuantError("method 'mobiquant' needs a calibrated checkpoint (mobiquant calibrate --out DIR)")
    return model


@register_method("mobiquant", _check_budget_range)
def _mobiquant(setup: EvalSetup, bits: list[float]) -> Iterator[EvalRow]:
    _routed(setup)
    for b in bits:
        ppl, realized, tokens, sec = setup.routed_ppl(b, "router", f"mobiquant {b:g}b")
        yield EvalRow("mobiquant", b, realized, ppl, tokens, sec)


@register_method("random", _check_budget_range)
def _random(setup: EvalSetup, bits: list[float]) -> Iterator[EvalRow]:
    for b in bits:
        ppl, realized, tokens, sec = setup.routed_ppl(b, "random", f"random {b:g}b")
        yield EvalRow("random", b, realized, ppl, tokens, sec)


def bitspecific_model(setup: EvalSetup, bits: int) -> nn.Module:
    """The full-precision model calibrated at one width (one slice of ``bits``), same group size and recipe;
    cached under the mobiquant cache directory."""
    from .calibrate import CalibConfig, calibrate_
    from .calibrate.data import cache_dir
    from .io import load_quantized, save_quantized

    calib = dataclasses.replace(setup.calib or CalibConfig(), stages=("clip",))
    config = dataclasses.replace(setup.config, slice_bits=(int(bits),))
    fp = setup.fp_model()
    source = getattr(fp.config, "mobiquant_source", None) or fp.config.name_or_path
    key = json.dumps([source, config.to_dict(), dataclasses.asdict(calib)], sort_keys=True, default=str)
    path = cache_dir() / "bitspecific" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "mobiquant_config.json").is_file():
        return load_quantized(path, device=next(fp.parameters()).device)[0]
    model = calibrate_(copy.deepcopy(fp), setup.tokenizer, config, calib, progress=setup.progress)
    save_quantized(model, path)
    return model


@register_method("bitspecific", _check_integer_bits)
def _bitspecific(setup: EvalSetup, bits: list[float]) -> Iterator[EvalRow]:
    for b in bits:
        t0 = time.perf_counter()
        model = bitspecific_model(setup, int(b))
        print(f"bitspecific {b:g} bits: calibrated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        ppl, tokens, sec = setup.ppl(model, f"bitspecific {b:g}b")
        yield EvalRow("bitspecific", b, float(b), ppl, tokens, sec)
        del model


def plan_methods(config: MoBiQuantConfig, methods: list[str], bits: list[float]) -> dict[str, list[float]]:
    """Budgets each method runs; a method that can run none of them is an error, others skip with a note."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MoBiQuantError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    plan = {}
    for m in methods:
        ok, errors = [], []
        for b in bits:
            try:
                if m in BITS_CHECKS:
                    BITS_CHECKS[m](config, b)
                ok.append(b)
            except MoBiQuantError as e:
                errors.append(e)
        if not ok:
            raise MoBiQuantError(f"method {m!r}: {errors[0]}")
        for e in errors:
            print(f"note: method {m!r} skips a budget: {e}", file=sys.stderr)
        plan[m] = ok
    return plan


def run_methods(setup: EvalSetup, methods: list[str], bits: list[float]) -> Iterator[EvalRow]:
    for m, ok in plan_methods(setup.config, methods, bits).items():
        yield from METHODS[m](setup, ok)


def format_table(rows: list[EvalRow]) -> str:
    import pandas as pd

    df = pd.DataFrame([r.to_dict() for r in rows])
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
