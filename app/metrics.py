"""Live metrics of a generation: speed, realized bits, weight bytes read per token, memory.

    meter = Meter(WeightBytes(model), device)
    meter.start()                       # when the request arrives (time to first token counts from here)
    for step in elastic_generate(...):
        m = meter.update(step)          # dict for views.metrics_html

Weight bytes per token: for each quantized linear, the bytes of the planes of the slices that token used plus the fp16
scale and zero point (``MoBiQuantLinear.bits_per_weight(k)``), summed over the linears, from the step's
(layers, linears) slice counts. It is what a kernel that reads only the active slices loads per decoded token.
"""

from __future__ import annotations

import os
import time

import torch

from mobiquant import quantized_linears
from mobiquant.trace import split_name


class WeightBytes:
    """(layers, linears) slice counts -> bytes of quantized weights read for one token."""

    def __init__(self, model):
        linears = quantized_linears(model)
        layers = 1 + max(split_name(n)[0] for n in linears)
        leaves = sorted({split_name(n)[1] for n in linears})
        E = max(m.num_slices for m in linears.values())
        self.table = torch.zeros(layers, len(leaves), E + 1, dtype=torch.float64)  # [layer, linear, k] -> bytes
        self.leaves = leaves
        for n, m in linears.items():
            i, leaf = split_name(n)
            for k in range(1, m.num_slices + 1):
                self.table[i, leaves.index(leaf), k] = m.bits_per_weight(k) * m.in_features * m.out_features / 8

    def __call__(self, slices: torch.Tensor, names: list[str]) -> float:
        cols = [self.leaves.index(n) for n in names]
        t = self.table[:, cols]  # (layers, linears, E + 1)
        return float(t.gather(2, slices.long().clamp(0, t.shape[2] - 1)[..., None]).sum())


def memory(device: torch.device) -> dict[str, float]:
    """MiB: GPU allocated and peak on CUDA; the process's resident set on the CPU."""
    out = {}
    if device.type == "cuda":
        out["GPU allocated"] = torch.cuda.memory_allocated(device) / 2**20
        out["GPU peak"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["process RSS"] = _rss_bytes() / 2**20
    return out


def _rss_bytes() -> float:
    try:
        import psutil

        return float(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Meter:
    """Running metrics of one generation (module docstring)."""

    def __init__(self, weight_bytes: WeightBytes, device: torch.device):
        self.weight_bytes, self.device = weight_bytes, torch.device(device)
        self.start()

    def start(self) -> None:
        self.t_request = time.perf_counter()
        self.ttft = None
        self.decode_seconds, self.decode_tokens, self.bits_sum, self.n = 0.0, 0, 0.0, 0
        self.last: dict = {"state": "idle", "device": self.device.type}

    def update(self, step) -> dict:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t_request
        else:  # the first step includes the prompt's prefill: speed counts decode steps only
            self.decode_seconds += step.seconds
            self.decode_tokens += 1
        self.n += 1
        self.bits_sum += step.bits
        self.last = {
            "state": "generating", "device": self.device.type, "tokens": self.n,
            "ms_per_token": 1e3 * self.decode_seconds / self.decode_tokens if self.decode_tokens else None,
            "tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else None,
            "ttft_s": self.ttft, "bits": step.bits, "bits_avg": self.bits_sum / self.n,
            "bytes_per_token": self.weight_bytes(step.slices, step.linears), "memory": memory(self.device),
        }
        return self.last

    def snapshot(self, state: str) -> dict:
        """The last metrics with the memory read now and a new state ("done", "stopped", "error")."""
        return self.last | {"state": state, "memory": memory(self.device)}
