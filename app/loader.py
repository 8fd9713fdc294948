"""What the playground serves: a calibrated checkpoint, or a model calibrated once with the ``--fast`` recipe.

    served = load_served(checkpoint="ckpt/")                   # a directory written by `mobiquant calibrate`
    served = load_served(model="default")                      # first run: calibrate (progress bar), cache, serve
                                                               # later runs: the cached checkpoint, in seconds

On the CPU the weights of every precision are built at start-up: those of at most 4 bits as torch's int4 weights,
run by its CPU int4 kernel from bf16 activations (nn/linear.py, quant/int4pack.py; about 57 MiB per precision for the
embedded model), the others as fp16 dense weights (about 203 MiB each, half the bytes per decode step of fp32): the
slider then switches precision without a pause.
A checkpoint calibrated with the "adaptive" threshold mode keeps its table for evaluation; the playground decodes with
the "balanced" thresholds instead (route.py: a table lookup and a per-token tally; "layer" for the nested allocation),
because the adaptive mode re-sorts every linear's score history at every token, which a 2-core CPU cannot afford
while streaming.

The cache lives in ``$MOBIQUANT_CACHE/app`` (default ``~/.cache/mobiquant/app``), one directory per model, slice list
and group size; delete it to recalibrate. The outlier view compares against the full-precision weights: kept from the
model just calibrated, else loaded once from the checkpoint's source model when first asked for.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobiquant import MoBiQuantConfig, MoBiQuantError, quantized_linears
from mobiquant.calibrate.data import cache_dir


class HalfHead(torch.nn.Module):
    """The output projection with an fp16 copy of its weight, for CPU decoding: the embedded model's tied 49152 x 576
    head is a quarter of the bytes a decode step reads, 113 MB in fp32. Logits come back in the input's dtype; an
    overflow (never seen: logits are tens) is recomputed with the original head."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head
        self.register_buffer("weight16", head.weight.detach().to(torch.float16), persistent=False)
        self.bias16 = None if head.bias is None else head.bias.detach().to(torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(torch.float16), self.weight16, self.bias16)
        return y.to(x.dtype) if bool(torch.isfinite(y).all()) else self.head(x)


def _for_decoding(model):
    from mobiquant import set_dense_cache_
    from mobiquant.route import attach_thresholds_

    if getattr(model, "mobiquant_thresholds", "layer") == "adaptive":
        allocation = getattr(model, "mobiquant_allocation", "band")
        attach_thresholds_(model, "layer" if allocation == "nested" else "balanced", allocation)
    if next(model.parameters()).device.type == "cpu":  # every precision ready before the first request
        set_dense_cache_(model, True, build=True, dtype=torch.float16, int4=True)
        head = getattr(model, "lm_head", None)
        if isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32:
            model.lm_head = HalfHead(head)
    return model


@dataclass
class Served:
    model: torch.nn.Module
    tokenizer: object
    source: str | None  # the full-precision model the checkpoint came from (for the outlier view)
    checkpoint: Path | None
    _fp: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fp_weight(self, name: str) -> torch.Tensor:
        """Full-precision weight of a quantized linear (loads the source model once, keeps only its linears)."""
        with self._lock:
            if not self._fp:
                if not self.source:
                    raise MoBiQuantError("this checkpoint does not record its source model: the outlier view needs "
                                         "its full-precision weights")
                from mobiquant import load_model

                fp, _ = load_model(self.source)
                self._fp.update(_linear_weights(fp, quantized_linears(self.model)))
                del fp
        if name not in self._fp:
            raise MoBiQuantError(f"{name!r} is not a quantized linear of this model")
        return self._fp[name]


def _linear_weights(model, names) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().to(torch.float16).clone() for n in names}


def app_cache_dir(model: str, config: MoBiQuantConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name if model != "default" else "default").strip("-")
    key = hashlib.sha256(repr((model, config.to_dict())).encode()).hexdigest()[:8]
    return cache_dir() / "app" / f"{slug}-{'-'.join(map(str, config.slice_bits))}-{key}"


def load_served(model: str = "default", checkpoint: str | Path | None = None, config: MoBiQuantConfig | None = None,
                device: str | torch.device = "cpu", progress: bool = True) -> Served:
    """The model the app serves (module docstring). Raises MoBiQuantError with a clear message on bad input."""
    from mobiquant import load_quantized

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_dir():
            raise MoBiQuantError(f"no such checkpoint directory: {checkpoint}")
        q, tok = load_quantized(path, device=device)
        if tok is None:
            raise MoBiQuantError(f"{checkpoint} has no tokenizer: save it with save_quantized(model, dir, tokenizer)")
        _require_routers(q, str(path))
        return Served(_for_decoding(q), tok, getattr(q.config, "mobiquant_source", None), path)
    config = config or MoBiQuantConfig()
    path = app_cache_dir(model, config)
    if (path / "mobiquant_config.json").is_file():
        print(f"mobiquant app: using the calibrated checkpoint cached in {path}", flush=True)
        q, tok = load_quantized(path, device=device)
        return Served(_for_decoding(q), tok, model, path)
    from mobiquant import CalibConfig, calibrate_, load_model, save_quantized

    fp, tok = load_model(model)
    fp_weights = _linear_weights(fp, _target_names(fp, config))
    recipe = CalibConfig.fast()
    print(f"mobiquant app: first run with {model!r}: calibrating (--fast recipe: {recipe.samples} samples x "
          f"{recipe.seqlen} tokens, {recipe.epochs} epoch); cached in {path}", flush=True)
    q = calibrate_(fp, tok, config, recipe, progress=progress)
    save_quantized(q, path, tok)
    print(f"mobiquant app: calibrated in {q.mobiquant_calibration['seconds']:.0f} s", flush=True)
    return Served(_for_decoding(q.to(device)), tok, model, path, fp_weights)


def _target_names(model, config: MoBiQuantConfig) -> list[str]:
    from mobiquant.api import target_linears

    return list(target_linears(model, config))


def _require_routers(model, where: str) -> None:
    if not quantized_linears(model):
        raise MoBiQuantError(f"{where} has no quantized linears")
    if not any(getattr(m, "router", None) is not None for m in quantized_linears(model).values()):
        raise MoBiQuantError(f"{where} has no routers (made by `mobiquant quantize`?): the playground needs a "
                             "calibrated checkpoint (`mobiquant calibrate --out DIR`)")
