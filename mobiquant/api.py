"""``quantize_``: swap a causal LM's decoder linears for MoBiQuantLinear, in place (the torchao verb)."""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn
from tqdm.auto import tqdm

from .config import MoBiQuantConfig
from .errors import MoBiQuantError
from .nn.linear import MoBiQuantLinear


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (``model.model.layers`` for the LLaMA family), else the largest
    ModuleList of the model."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise MoBiQuantError(f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of layers)")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def target_linears(model: nn.Module, config: MoBiQuantConfig) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear for every linear the config quantizes (decoder blocks only)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    found = {}
    for name, m in layers.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(m, nn.Linear) and (config.modules is None or any(fnmatch(full, p) for p in config.modules)):
            found[full] = m
    if not found:
        what = "no nn.Linear layers" if config.modules is None else f"no nn.Linear matching {list(config.modules)}"
        raise MoBiQuantError(f"{type(model).__name__} has {what} in its decoder blocks: nothing to quantize")
    return found


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_(model: nn.Module, config: MoBiQuantConfig | None = None, *, progress: bool = False) -> nn.Module:
    """Replace each targeted ``nn.Linear`` of ``model`` by ``MoBiQuantLinear.from_linear`` (in place; returns model).

    Every group size is checked before anything is changed, so a bad config leaves the model untouched.
    """
    config = config or MoBiQuantConfig()
    linears = target_linears(model, config)
    for lin in linears.values():
        config.group_size_for(lin.in_features)
    for name, lin in tqdm(linears.items(), desc="slicing linears", disable=not progress, leave=False):
        q = MoBiQuantLinear.from_linear(lin, config)
        q.name = name
        replace_module(model, name, q)
    model.mobiquant_config = config
    return model


def quantized_linears(model: nn.Module) -> dict[str, MoBiQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoBiQuantLinear)}
