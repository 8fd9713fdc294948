"""Save and load a quantized model: safetensors + JSON, never pickle.

A checkpoint directory holds

    model.safetensors      every tensor of the quantized model (planes, scales, zero points, the full-precision
                           embeddings / norms / lm_head, routers later); metadata ``format=mobiquant``
    mobiquant_config.json  the MoBiQuantConfig, the list of quantized linears, the model class and its source
    config.json            the Hugging Face model config (architecture)
    tokenizer files

Loading builds the architecture on the meta device (no weights allocated), swaps in empty MoBiQuantLinear
skeletons, then assigns the stored tensors: full-size weights are never materialised, let alone twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .api import quantized_linears, replace_module
from .config import MoBiQuantConfig
from .errors import MoBiQuantError
from .models import CHECKPOINT_CONFIG
from .nn.linear import MoBiQuantLinear
from .nn.router import MoBiRoute

WEIGHTS_FILE = "model.safetensors"
FORMAT = "mobiquant"
FORMAT_VERSION = 1


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (already through ``quantize_``) to ``directory``; returns the directory."""
    config: MoBiQuantConfig | None = getattr(model, "mobiquant_config", None)
    linears = quantized_linears(model)
    if config is None or not linears:
        raise MoBiQuantError("this model is not quantized: run mobiquant.quantize_(model, config) first")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:  # tied weights (lm_head = embed_tokens): safetensors stores a tensor once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "aliases": json.dumps(aliases)}
    # write to a temporary file first: a failed save never leaves a half-written checkpoint behind
    with tempfile.NamedTemporaryFile(dir=d, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, d / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    hf_config = model.config
    hf_config.save_pretrained(d)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mobiquant": config.to_dict(),
        "model_class": type(model).__name__,
        "source": getattr(hf_config, "mobiquant_source", None),
        "linears": sorted(linears),
        "routed": sorted(n for n, m in linears.items() if m.router is not None),
        "calibration": _calibration_info(model),
    }
    (d / CHECKPOINT_CONFIG).write_text(json.dumps(info, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


def _calibration_info(model) -> dict | None:
    cal = getattr(model, "mobiquant_calibration", None)
    if cal is None:
        return None
    import dataclasses

    return {"recipe": dataclasses.asdict(cal["calib"]), "seconds": cal["seconds"]}


def _read_info(d: Path) -> dict:
    if not d.is_dir():
        raise MoBiQuantError(f"no such checkpoint directory: {d}")
    path = d / CHECKPOINT_CONFIG
    if not path.is_file():
        raise MoBiQuantError(f"{d} is not a mobiquant checkpoint (no {CHECKPOINT_CONFIG})")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoBiQuantError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT or "mobiquant" not in info:
        raise MoBiQuantError(f"{path} was not written by mobiquant")
    if info.get("format_version") != FORMAT_VERSION:
        raise MoBiQuantError(f"checkpoint format {info.get('format_version')} is not supported ({FORMAT_VERSION})")
    return info


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MoBiQuantError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise MoBiQuantError(f"{path} is a safetensors file, but not a mobiquant checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except SafetensorError as e:
        raise MoBiQuantError(f"{path} is corrupt or truncated ({e})") from e
    except OSError as e:
        raise MoBiQuantError(f"cannot read {path}: {e}") from e
    for alias, source in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[source]
    return tensors


def load_quantized(directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` written by ``save_quantized`` (tokenizer is None if none was saved)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(directory).expanduser()
    info = _read_info(d)
    config = MoBiQuantConfig.from_dict(info["mobiquant"])
    tensors = _read_tensors(d / WEIGHTS_FILE)
    try:
        hf_config = AutoConfig.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MoBiQuantError(f"{d}/config.json is missing or invalid: {str(e).splitlines()[0]}") from e
    with init_empty_weights():  # parameters on the meta device; buffers such as RoPE tables stay real
        model = AutoModelForCausalLM.from_config(hf_config)
    routed = set(info.get("routed", []))
    for name in info["linears"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise MoBiQuantError(f"checkpoint does not match its architecture: no linear layer {name}")
        skeleton = MoBiQuantLinear(lin.in_features, lin.out_features, config.slice_bits,
                                   config.group_size_for(lin.in_features), bias=lin.bias is not None,
                                   device="meta", dtype=lin.weight.dtype)
        skeleton.name = name
        if name in routed:
            skeleton.router = MoBiRoute(lin.in_features, config.num_slices, config.router_hidden, device="meta")
        replace_module(model, name, skeleton)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise MoBiQuantError(f"checkpoint tensors do not fit the model: {str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise MoBiQuantError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise MoBiQuantError(f"checkpoint does not provide {still_meta[:3]}")
    model.mobiquant_config = config
    model.config.mobiquant_source = info.get("source")
    model.mobiquant_calibration = None
    if info.get("calibration"):
        from .calibrate import CalibConfig

        recipe = dict(info["calibration"]["recipe"])
        recipe["stages"] = tuple(recipe.get("stages", ("clip", "route")))
        model.mobiquant_calibration = {"calib": CalibConfig(**recipe), "seconds": info["calibration"]["seconds"],
                                       "losses": None}
    if routed:
        from .route import attach_thresholds_

        attach_thresholds_(model, config.thresholds, config.allocation)
    tokenizer = None
    if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model.to(device).eval(), tokenizer
