"""Typed, validated configuration of a MoBiQuant model (saved as ``mobiquant_config.json`` beside the weights)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import MoBiQuantError

CONFIG_VERSION = 1
AUTO_GROUP_SIZES = (128, 64, 32)  # the default group is the largest of these that divides in_features
MAX_TOTAL_BITS = 16


def auto_group_size(in_features: int) -> int:
    """Largest of 128/64/32 dividing ``in_features`` (SmolLM2's 576 -> 64, 1536 -> 128)."""
    for g in AUTO_GROUP_SIZES:
        if in_features % g == 0:
            return g
    raise MoBiQuantError(
        f"in_features={in_features} is not a multiple of any default group size {AUTO_GROUP_SIZES}; "
        "pass an explicit group size that divides it"
    )


@dataclass(frozen=True)
class MoBiQuantConfig:
    """How each linear is sliced.

    slice_bits:  b_1..b_E, bits of each slice; the first is the base slice. ``(2, 2, 2, 2)`` is the paper's
                 default (2/4/6/8 bits); any list of positive counts works, e.g. ``(3, 1, 1, 1, 1, 1)``.
    group_size:  weights per (scale, zero point) pair along in_features; None = per layer, the largest of
                 128/64/32 that divides in_features.
    modules:     fnmatch patterns of the module names to quantize (e.g. ``("*.mlp.*",)``); None = every
                 ``nn.Linear`` inside the decoder blocks. Embeddings and lm_head always stay in full precision.
    router_hidden: hidden width of each layer's MoBiRoute MLP (used once the model is calibrated).
    thresholds:  budget -> threshold map: "layer" (each layer realizes the budget), "global" (one threshold),
                 "adaptive" (per layer, following the text being processed) or "balanced" (per layer, pushing
                 each token toward the budget over the linears it has passed; fisher or band allocation; route.py).
    allocation:  (default: "fisher" with the balanced thresholds, "band" with the others)
                 "fisher" (each linear gets its share of the budget from its cost curve, measured at calibration:
                 sensitive linears more bits, robust ones fewer; inside a linear each token runs at one of the two
                 precisions around its share, the router picks which), "band" (every linear at the budget: each
                 token at one of the two uniform precisions around it) or "nested" (any slice count, where the
                 scores cross the threshold).
    """

    slice_bits: tuple[int, ...] = (2, 2, 2, 2)
    group_size: int | None = None
    modules: tuple[str, ...] | None = None
    router_hidden: int = 16
    thresholds: str = "balanced"
    allocation: str | None = None  # None: "fisher" with the balanced thresholds, else "band"
    version: int = CONFIG_VERSION
    extra: dict = field(default_factory=dict)  # free-form provenance (source model, ...); not used for math

    def __post_init__(self):
        bits = tuple(self.slice_bits)
        object.__setattr__(self, "slice_bits", bits)
        if not bits:
            raise MoBiQuantError("slice_bits must list at least one slice")
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 or b > 8 for b in bits):
            raise MoBiQuantError(f"every slice needs 1..8 bits, got slice_bits={bits}")
        if sum(bits) > MAX_TOTAL_BITS:
            raise MoBiQuantError(f"slices add up to {sum(bits)} bits; at most {MAX_TOTAL_BITS} are supported")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 8 or g % 8):
            raise MoBiQuantError(f"group_size must be a positive multiple of 8, got {g!r}")
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(self.modules))
        if not isinstance(self.router_hidden, int) or self.router_hidden < 1:
            raise MoBiQuantError(f"router_hidden must be a positive integer, got {self.router_hidden!r}")
        if self.thresholds not in ("layer", "global", "adaptive", "balanced"):
            raise MoBiQuantError(f"thresholds must be 'layer', 'global', 'adaptive' or 'balanced', got "
                                 f"{self.thresholds!r}")
        if self.allocation is None:
            object.__setattr__(self, "allocation", "fisher" if self.thresholds == "balanced" else "band")
        if self.allocation not in ("fisher", "band", "nested"):
            raise MoBiQuantError(f"allocation must be 'fisher', 'band' or 'nested', got {self.allocation!r}")
        if self.thresholds == "balanced" and self.allocation == "nested":
            raise MoBiQuantError("thresholds='balanced' needs allocation='fisher' or 'band'")
        if self.allocation == "fisher" and self.thresholds != "balanced":
            raise MoBiQuantError("allocation='fisher' needs thresholds='balanced'")
        if self.version != CONFIG_VERSION:
            raise MoBiQuantError(f"config version {self.version} is not supported (this mobiquant reads "
                                 f"{CONFIG_VERSION})")

    @property
    def num_slices(self) -> int:
        """E."""
        return len(self.slice_bits)

    @property
    def precisions(self) -> list[int]:
        """B_k for k = 1..E: the bit widths one checkpoint serves."""
        out, total = [], 0
        for b in self.slice_bits:
            total += b
            out.append(total)
        return out

    def group_size_for(self, in_features: int) -> int:
        if self.group_size is None:
            return auto_group_size(in_features)
        if in_features % self.group_size:
            raise MoBiQuantError(f"group_size {self.group_size} does not divide in_features={in_features}")
        return self.group_size

    def slices_for_bits(self, bits: float) -> int:
        """k such that B_k == bits (a uniform precision), else a clear error."""
        for k, B in enumerate(self.precisions, start=1):
            if B == bits:
                return k
        raise MoBiQuantError(f"{bits:g} bits is not a uniform precision of slices {self.slice_bits}: {self.precisions}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoBiQuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MoBiQuantError(f"unknown MoBiQuantConfig fields: {sorted(unknown)}")
        d = dict(d)
        d["slice_bits"] = tuple(d.get("slice_bits", (2, 2, 2, 2)))
        if d.get("modules") is not None:
            d["modules"] = tuple(d["modules"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
