"""Perplexity on non-overlapping windows, and the evaluation methods of ``mobiquant eval``.

Protocol: the text file is read as is (its lines joined by their own newlines), tokenized once without special
tokens, cut into consecutive windows of ``seqlen`` tokens (the tail that does not fill a window is dropped), and the
mean next-token negative log-likelihood over every predicted token gives ppl = exp(mean NLL).

Methods are registered by name (``@register_method``) and yield ``EvalRow``s; later issues add methods (routed
MoBiQuant, random routing, bit-specific calibration) the same way.
"""

from __future__ import annotations

import copy
import math
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
from .precision import precision
from .quant.rtn import rtn_quantize


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


def _check_rtn_bits(config: MoBiQuantConfig, b: float) -> None:
    if b != int(b) or not 2 <= b <= 8:
        raise MoBiQuantError(f"rtn needs an integer width 2..8, got {b:g} bits")


@register_method("rtn", _check_rtn_bits)
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


def check_methods(config: MoBiQuantConfig, methods: list[str], bits: list[float]) -> None:
    """Reject an unknown method or a width a method cannot run, before any model is loaded."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MoBiQuantError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    for m in methods:
        for b in bits:
            if m in BITS_CHECKS:
                BITS_CHECKS[m](config, b)


def run_methods(setup: EvalSetup, methods: list[str], bits: list[float]) -> Iterator[EvalRow]:
    check_methods(setup.config, methods, bits)
    for m in methods:
        yield from METHODS[m](setup, bits)


def format_table(rows: list[EvalRow]) -> str:
    import pandas as pd

    df = pd.DataFrame([r.to_dict() for r in rows])
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
