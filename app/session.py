"""Per-session generation state and the server-side limits of the playground.

Every browser tab (and every ``gradio_client.Client``) is one session, keyed by Gradio's ``session_hash``. A session
owns at most one running generation: its ``BudgetControl`` (which the budget slider and Stop write, and which
``elastic_generate`` reads before every token), the steps so far and its meter. Nothing is shared between sessions
except the model, which ``mobiquant.precision`` makes safe to share (the budget is per call, not stored in it).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from mobiquant import BudgetControl, MoBiQuantError
from mobiquant.generate import MODES

from .metrics import Meter


@dataclass(frozen=True)
class Limits:
    """Server-side caps; requests beyond them get a clear error, whatever the client sends."""

    max_prompt_chars: int = 4000
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    max_compare_tokens: int = 128
    max_outlier_tokens: int = 512
    queue_size: int = 16  # requests waiting in the queue, beyond which new ones are refused
    concurrency: int = 2  # generations running at once (they share the CPU cores or the GPU)
    max_sessions: int = 256  # oldest idle sessions are forgotten beyond this


def check_prompt(text, limits: Limits, what: str = "prompt") -> str:
    if not isinstance(text, str) or not text.strip():
        raise MoBiQuantError(f"the {what} is empty: type some text")
    if len(text) > limits.max_prompt_chars:
        raise MoBiQuantError(f"the {what} has {len(text):,} characters; the limit is {limits.max_prompt_chars:,}")
    return text


def check_count(value, low: int, high: int, what: str) -> int:
    """An integer in [low, high] (sliders send floats such as 64.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MoBiQuantError(f"{what} must be a whole number, got {value!r}")
    if value != int(value) or not low <= value <= high:
        raise MoBiQuantError(f"{what} must be a whole number from {low} to {high}, got {value:g}")
    return int(value)


def check_sampling(temperature, top_p) -> tuple[float, float]:
    for v, name in ((temperature, "temperature"), (top_p, "top-p")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MoBiQuantError(f"{name} must be a finite number, got {v!r}")
    if not 0 < temperature <= 5:
        raise MoBiQuantError(f"temperature must be in (0, 5], got {temperature:g}")
    if not 0 < top_p <= 1:
        raise MoBiQuantError(f"top-p must be in (0, 1], got {top_p:g}")
    return float(temperature), float(top_p)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise MoBiQuantError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


@dataclass
class Run:
    """One generation of one session."""

    control: BudgetControl
    meter: Meter
    steps: list = field(default_factory=list)
    view: tuple[int | None, str | None] = (None, None)  # colour by: (layer or None = all, linear or None = all)


class Sessions:
    """session_hash -> the session's current Run (thread-safe; bounded, oldest first out)."""

    def __init__(self, limit: int = 256):
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    def start(self, key: str, run: Run) -> Run:
        with self._lock:
            old = self._runs.pop(key, None)
            if old is not None:
                old.control.stop = True  # a new Generate in the same tab ends the previous generation
            self._runs[key] = run
            while len(self._runs) > self.limit:
                _, dropped = self._runs.popitem(last=False)
                dropped.control.stop = True
            return run

    def get(self, key: str) -> Run | None:
        with self._lock:
            return self._runs.get(key)

    def drop(self, key: str) -> None:
        with self._lock:
            run = self._runs.pop(key, None)
        if run is not None:
            run.control.stop = True

    def __len__(self) -> int:
        return len(self._runs)
