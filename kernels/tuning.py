"""Tuned launch configurations, saved per GPU as JSON in ``configs/`` (data, like gemlite's ``configs/<gpu>.json``).

A file ``configs/<gpu>.json`` (gpu = the device name, lower case, spaces -> '_', e.g. ``nvidia_h100_80gb_hbm3``;
``h100.json`` matches any H100) maps ``"<kernel>:<M-bucket>:<N>:<K>"`` to a config dict (BLOCK_N, SPLIT_K, ...).
M is bucketed (1, 2, 4, 8, 16 for decode; 64, 256, 1024, 4096+ for prefill). Missing entries fall back to the
kernels' ``default_config`` heuristics. ``benchmarks/kernels.py --tune`` writes these files.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def m_bucket(M: int) -> int:
    for b in (1, 2, 4, 8, 16, 64, 256, 1024):
        if M <= b:
            return b
    return 4096


def key(kernel: str, M: int, N: int, K: int) -> str:
    return f"{kernel}:{m_bucket(M)}:{N}:{K}"


@functools.lru_cache(maxsize=8)
def _load(device_index: int) -> dict:
    import torch

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name(device_index).lower().replace(" ", "_")
    candidates = [CONFIG_DIR / f"{name}.json"]
    for short in ("h100", "h200", "a100"):
        if short in name:
            candidates.append(CONFIG_DIR / f"{short}.json")
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())
    return {}


def lookup(kernel: str, M: int, N: int, K: int, device_index: int | None = None) -> dict | None:
    """The tuned config for this kernel and shape on the current GPU, or None."""
    if device_index is None:
        import torch

        device_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return _load(device_index).get(key(kernel, M, N, K))
