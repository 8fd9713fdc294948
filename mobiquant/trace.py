"""RoutingTrace: what every quantized linear used, per token. The only routing object the app reads.

Each MoBiQuantLinear called inside ``precision(..., trace=trace)`` records its per-token slice counts n_t. Realized
bits weigh every linear by its number of weights: the average code bits per weight actually read.

Counts recorded on a CUDA device are kept there and copied to the host only when the trace is read (``counts``,
``realized_bits``, ``matrix``): recording never waits for the GPU, so a traced forward has no host synchronisation.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@functools.lru_cache(maxsize=4096)  # the same few hundred names at every decode step
def split_name(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); (-1, name) outside the decoder blocks."""
    m = _LAYER.search(name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


@dataclass
class RoutingTrace:
    """keep=True keeps every count tensor (generation, the app); keep=False only the running totals (eval)."""

    keep: bool = True
    _counts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _bits_weights: float = 0.0  # Σ over calls and tokens of B_{n_t} * weights of the linear
    _weights: float = 0.0  # Σ over calls and tokens of weights of the linear
    _pending: list = field(default_factory=list)  # records whose counts are still on a GPU

    def record(self, name: str, counts: torch.Tensor | int, precisions, n_weights: int) -> None:
        """counts (...) integers in 1..E, or a Python int for one token (the CPU decode path: no tensor work);
        precisions (E+1,) with precisions[k] = B_k (precisions[0] = 0), a tensor or a sequence of floats."""
        if isinstance(counts, int):
            self._bits_weights += float(precisions[counts]) * n_weights
            self._weights += n_weights
            if self.keep:
                self._counts.setdefault(name, []).append(counts)
            return
        c = counts.detach().reshape(-1)
        if c.device.type != "cpu":  # read later, all at once: recording never waits for the device
            self._pending.append((name, c, precisions, n_weights))
            return
        self._add(name, c.long(), precisions, n_weights)

    def _add(self, name, c, precisions, n_weights) -> None:
        self._bits_weights += float(precisions[c].sum()) * n_weights
        self._weights += c.numel() * n_weights
        if self.keep:
            self._counts.setdefault(name, []).append(c)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            sizes = [c.numel() for _, c, _, _ in pending]
            host = torch.cat([c for _, c, _, _ in pending]).long().cpu()  # one copy for every pending record
            for (name, _, precisions, n_weights), h in zip(pending, host.split(sizes)):
                self._add(name, h, precisions, n_weights)

    @property
    def counts(self) -> dict[str, list[torch.Tensor]]:
        """Layer name -> one (tokens,) long tensor per call, on the CPU (kept only with keep=True)."""
        self._flush()
        for calls in self._counts.values():  # one-token records are kept as ints until read
            for i, c in enumerate(calls):
                if isinstance(c, int):
                    calls[i] = torch.tensor([c])
        return self._counts

    def realized_bits(self) -> float:
        self._flush()
        return self._bits_weights / self._weights if self._weights else float("nan")

    def matrix(self, step: int = -1) -> tuple[torch.Tensor, list[str]]:
        """(layers, linears) slice counts of the last token of call ``step`` and the linear names (columns)."""
        self._flush()
        parts = {n: split_name(n) for n in self._counts}
        names = sorted({leaf for _, leaf in parts.values()}, key=_LINEAR_ORDER)
        column = {leaf: j for j, leaf in enumerate(names)}
        layers = 1 + max(i for i, _ in parts.values())
        out = [[0] * len(names) for _ in range(layers)]
        for n, calls in self._counts.items():
            i, leaf = parts[n]
            if i >= 0:
                c = calls[step]
                out[i][column[leaf]] = c if isinstance(c, int) else int(c[-1])
        return torch.tensor(out, dtype=torch.long), names


_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _LINEAR_ORDER(leaf: str):
    base = leaf.rsplit(".", 1)[-1]
    return (_ORDER.index(base) if base in _ORDER else len(_ORDER), leaf)
