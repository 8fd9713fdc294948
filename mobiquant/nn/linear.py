"""MoBiQuantLinear: a linear layer stored as E bit-sliced planes, run at a per-token number of slices.

Stored (buffers, all in the state dict):

    plane_e  (N, K * b_e / 8) uint8   slice e's codes, one packed plane per slice (quant/packing.py)
    scale    (N, G) fp16              s_1, the shared base scale of each group
    zero     (N, G) fp16              z_1, the base zero point (in units of s_1)
    bias     (N,)                     kept in full precision, as in nn.Linear

Forward ``y = layer(x)`` with x (..., K) reads the slice count k from the caller's ``mobiquant.precision(...)``
block (or the ``k=`` argument): an int for all tokens or one count per token (shaped like x[..., 0]). Given a bit
budget instead, the layer's router (``router``, a MoBiRoute, after calibration) scores each token and the shared
``thresholds`` table (route.py) turns the scores into per-token counts. Inside ``precision(trace=...)`` the layer
records what it used under its ``name``.

Two torch paths give the same result (up to fp32 summation order):

* **slices** (reference, no extra memory): y = Σ_e x[n_t ≥ e] ΔŴ_eᵀ. Slice e's plane is unpacked and its
  partial product computed only for the tokens that use it (paper Eq. 6); a token at k slices costs k products.
* **dense** (the CPU fast path, on by default): Ŵ_k is materialised once per precision k actually used and cached;
  tokens are grouped by k and each group is one ``F.linear``. Decode then costs what the unquantized layer costs,
  at the price of up to E dense weights in memory (benchmarks/elastic_ppl.py reports it). Never a dense weight per
  token. ``set_dense_cache_(model, False)`` switches a model to the reference path and frees the caches.
  With ``set_dense_cache_(..., int4=True)`` the precisions of at most 4 bits are cached on the CPU as torch's int4
  weight instead (their codes fit in 4 bits: quant/int4pack.py), a quarter of fp16's bytes, and computed with
  ``torch._weight_int4pack_mm_for_cpu`` from bf16 activations; higher precisions keep the dense weight.

**Kernels (CUDA).** When the buffers and x are on a CUDA device, x is fp16 or bf16, triton can be imported and the
layer fits the kernels (2-bit slices, E <= 4, K % 16 == 0, group size % 32 == 0: ``ops.kernel_compatible``), the
forward calls the custom op ``torch.ops.mobiquant.sliced_linear`` (mobiquant/ops.py) on the planes converted once
per device to the kernels' layout (``mobiquant.kernels.PackedSlices``, cached like the dense weights and cleared
whenever the module is moved, cast or reloaded). Every other case takes the torch paths above: CPU, fp32
activations, slice lists such as 3,1,1,1,1,1, ``use_kernels = False``, and any forward that autograd records (the
op has no backward). On the kernel path nothing waits for the GPU: per-token counts stay on the device and are not
range-checked on the host (the kernel clamps them to 1..E; counts given on the CPU are still checked), and a
routing trace copies its counts to the host only when it is read (trace.py). Routing by budget is device-only in
the "layer" and "global" threshold modes; the "adaptive" mode keeps a Python-side history of scores and
synchronises (the decode engine, mobiquant/engine.py, uses the layer thresholds).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import MoBiQuantConfig
from ..errors import MoBiQuantError
from ..precision import check_budget, current_precision
from ..quant import int4pack, packing, slices
from ..route import ThresholdTable, forced_count, random_counts
from .router import MoBiRoute, nested_counts, threshold_for_bits
from .shared_input import token_scores

ROWS_PER_PASS = 8192  # output rows sliced at a time by set_weight_ (memory, not results)


class MoBiQuantLinear(nn.Module):
    KERNEL_DEVICES = ("cuda",)  # device types whose forward uses the kernels (tests add "cpu" under TRITON_INTERPRET)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        slice_bits: tuple[int, ...],
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if in_features % group_size:
            raise MoBiQuantError(f"group_size {group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.slice_bits, self.group_size = tuple(slice_bits), group_size
        N, K, G = out_features, in_features, in_features // group_size
        for e, b in enumerate(self.slice_bits, start=1):
            self.register_buffer(f"plane_{e}", torch.zeros(N, K * b // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(N, G, dtype=slices.STORAGE_DTYPE, device=device))
        self.register_buffer("zero", torch.zeros(N, G, dtype=slices.STORAGE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(N, device=device, dtype=dtype)) if bias else None
        self.router: MoBiRoute | None = None
        self.name = ""  # full module name, set by quantize_ / load (the trace's key)
        self.thresholds = None  # route.ThresholdTable shared by the model's routers
        self.shared_input = None  # shared_input.SharedInputRouters: this router run with its siblings' (decode)
        self.dense_cache = True
        self.dense_dtype: torch.dtype | None = None  # the dense path's compute dtype (None: x's dtype)
        self._dense: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self.int4_slices: frozenset[int] = frozenset()  # slice counts computed as int4 on the CPU (set_dense_cache_)
        self._int4: dict[int, int4pack.Int4Weight] = {}  # k -> the CPU int4 weight of Ŵ_k
        self.use_kernels = True  # on a CUDA device, when the configuration fits (module docstring)
        self._packed: dict[torch.device, object] = {}  # device -> mobiquant.kernels.PackedSlices

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: MoBiQuantConfig,
        clip_max: torch.Tensor | None = None,
        clip_min: torch.Tensor | None = None,
    ) -> MoBiQuantLinear:
        """Slice ``linear.weight`` (optionally with calibrated clipping factors, each (N, G))."""
        N, K = linear.weight.shape
        g = config.group_size_for(K)
        q = cls(K, N, config.slice_bits, g, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.set_weight_(linear.weight.detach(), clip_max, clip_min)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @torch.no_grad()
    def set_weight_(self, W: torch.Tensor, clip_max=None, clip_min=None, rows: int = ROWS_PER_PASS) -> None:
        """(Re)quantize from a full-precision weight W (N, K), ``rows`` output rows at a time. Each row's groups are
        sliced on their own, so the codes do not depend on ``rows``; it bounds the temporaries, about 8x the fp16
        bytes of the rows in flight (on the CPU, a 16384 x 4096 weight in one pass took 1.07 GB beyond the weight,
        in passes of 8192 rows 0.71 GB; LLaMA-3's lm_head in one pass would take ~8 GB)."""
        for r0 in range(0, W.shape[0], rows):
            part = slice(r0, r0 + rows)
            codes, s_1, z_1 = slices.decompose(W[part], self.group_size, self.slice_bits,
                                               None if clip_max is None else clip_max[part],
                                               None if clip_min is None else clip_min[part])
            for e, (c, b) in enumerate(zip(codes, self.slice_bits), start=1):
                getattr(self, f"plane_{e}")[part].copy_(packing.pack_nbit_u8(c, b))
            self.scale[part].copy_(s_1.to(self.scale.dtype))
            self.zero[part].copy_(z_1.to(self.zero.dtype))
        self._clear_caches()

    # ---------------------------------------------------------------- slices and weights
    @property
    def num_slices(self) -> int:
        return len(self.slice_bits)

    def plane(self, e: int) -> torch.Tensor:
        return getattr(self, f"plane_{e}")

    def codes(self, e: int) -> torch.Tensor:
        """c_e (N, K) uint8, unpacked from plane e (1-based)."""
        return packing.unpack_nbit_u8(self.plane(e), self.slice_bits[e - 1], self.in_features)

    def weight_k(self, k: int) -> torch.Tensor:
        """Ŵ_k (N, K) fp32 from the first k planes (shift-and-add, one shared scale)."""
        self._check_k(k)
        codes = [self.codes(e) for e in range(1, k + 1)]
        return slices.reconstruct(codes, self.scale.float(), self.zero.float(), self.slice_bits)

    def delta(self, e: int) -> torch.Tensor:
        """ΔŴ_e (N, K) fp32 from plane e alone."""
        return slices.slice_delta(self.codes(e), self.scale.float(), self.zero.float(), self.slice_bits, e)

    def bits_per_weight(self, k: int | None = None) -> float:
        """Storage read at k slices (default: all), per weight: codes + fp16 scale + fp16 zero point."""
        k = self.num_slices if k is None else k
        return sum(self.slice_bits[:k]) + 2 * 16 / self.group_size

    @property
    def precisions(self) -> list[int]:
        """B_k for k = 1..E."""
        return slices.cumulative_bits(self.slice_bits)

    @property
    def _bits_of(self) -> tuple[float, ...]:
        """(0, B_1, ..., B_E): bits of n slices, indexed by n (the trace's table), computed once."""
        table = self.__dict__.get("_bits_table")
        if table is None:
            table = self.__dict__["_bits_table"] = (0.0, *map(float, self.precisions))
        return table

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.num_slices:
            raise MoBiQuantError(f"k={k} slices requested; this layer has 1..{self.num_slices}")

    # ---------------------------------------------------------------- forward
    def route(self, x: torch.Tensor, budget: float, mode: str = "router", generator=None, fit=None,
              stream=None, tally=None) -> torch.Tensor:
        """Per-token slice counts (x.shape[:-1], long) for an average of ``budget`` bits. With ``fit`` (a dict,
        calibration only) τ is fitted to these tokens and stored as fit[name]; ``stream`` is the score history of
        the adaptive threshold mode, ``tally`` the balanced mode's per-token record of the current forward."""
        B = self.precisions
        budget = check_budget(budget, B[0], B[-1])
        if mode == "random":
            return random_counts(x.shape[:-1], self.slice_bits, budget, generator).to(x.device)
        if self.router is None:
            if budget in B:
                return torch.full(x.shape[:-1], B.index(budget) + 1, dtype=torch.long, device=x.device)
            raise MoBiQuantError(f"{self.name or 'this layer'} has no router (not calibrated): only the uniform "
                                 f"budgets {B} bits, or mode='random'")
        k = forced_count(tuple(self.slice_bits), budget) if fit is None else None
        if k is not None:  # B_1 or B_E: every count forced (ThresholdTable.counts gives the same), no router MLP
            return torch.full(x.shape[:-1], k, dtype=torch.long, device=x.device)
        scores = self.router(x)
        if fit is not None:
            fit[self.name] = threshold_for_bits(scores.reshape(-1, scores.shape[-1]), self.slice_bits, budget)
            return nested_counts(scores, fit[self.name])
        if self.thresholds is None:
            self.thresholds = ThresholdTable({self.name: self}, "layer")
        return self.thresholds.counts(self.name, scores, budget, stream, tally)

    def _route_token(self, x: torch.Tensor, p) -> int | None:
        """One token on the CPU (a decode step) in router mode: its slice count as a Python int, the same count as
        ``route`` with a handful of torch ops instead of a dozen (at ~5 µs each, that is most of a CPU decode step).
        None where ``route`` must decide: random mode, calibration fits, adaptive thresholds, no router."""
        if p.mode != "router" or p.fit is not None or self.router is None:
            return None
        if self.thresholds is None:
            self.thresholds = ThresholdTable({self.name: self}, "layer")
        if self.thresholds.mode == "adaptive":
            return None
        B = self._bits_of
        budget = check_budget(p.budget, B[1], B[-1])
        k = forced_count(tuple(self.slice_bits), budget)
        if k is not None:
            return k
        group = self.shared_input
        scores = group.scores(self, x) if group is not None else token_scores(self.router._inference_weights(), x)
        return self.thresholds.count_token(self.name, scores, budget, p.tally)

    @property
    def kernel_compatible(self) -> bool:
        """Whether this layer's configuration has a kernel (2-bit slices, E <= 4, K % 16, group % 32)."""
        return ops.kernel_compatible(self.slice_bits, self.in_features, self.group_size)

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the custom op (see the module docstring) rather than a torch path."""
        grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        return (self.use_kernels and not grad and x.device.type in self.KERNEL_DEVICES
                and x.dtype in (torch.float16, torch.bfloat16) and self.plane_1.device == x.device
                and self.kernel_compatible and ops.triton_available())

    def packed(self, device: torch.device | None = None):
        """The weight in the kernels' layout (``mobiquant.kernels.PackedSlices``) on ``device``, converted once."""
        device = torch.device(device) if device is not None else self.plane_1.device
        P = self._packed.get(device)
        if P is None:
            from ..kernels.layout import pack_slices

            planes = [self.plane(e).to(device) for e in range(1, self.num_slices + 1)]
            P = self._packed[device] = pack_slices(planes, self.scale.to(device), self.zero.to(device),
                                                   self.slice_bits)
        return P

    def forward(self, x: torch.Tensor, k: int | torch.Tensor | None = None) -> torch.Tensor:
        p = current_precision()
        if k is None and p is not None:
            k = p.k
            if k is None and p.budget is not None:
                k = self._route_token(x, p) if x.numel() == self.in_features and x.device.type == "cpu" else None
                if k is None:
                    k = self.route(x, p.budget, p.mode, p.generator, p.fit, p.stream, p.tally)
        if k is None:
            k = self.num_slices
        if self.uses_kernels(x):
            return self._forward_kernel(x, k, p)
        if isinstance(k, torch.Tensor):
            if k.shape != x.shape[:-1]:
                raise MoBiQuantError(f"per-token slice counts of shape {tuple(k.shape)} do not match tokens "
                                     f"{tuple(x.shape[:-1])}")
            lo, hi = (int(v) for v in torch.aminmax(k))
            self._check_k(lo)
            self._check_k(hi)
        else:
            k = int(k)
            self._check_k(k)
            lo = hi = k
        if p is not None and p.trace is not None:
            if isinstance(k, int) and x.numel() == self.in_features:  # one token: no tensor for the trace
                p.trace.record(self.name, k, self._bits_of, self.in_features * self.out_features)
            else:
                counts = k if isinstance(k, torch.Tensor) else torch.full(x.shape[:-1], k, dtype=torch.long)
                B = torch.tensor(self._bits_of)  # B[n] = bits of n slices
                p.trace.record(self.name, counts, B, self.in_features * self.out_features)
        if lo == hi:
            if self.dense_cache:
                return self._dense_linear(x, lo)
            y = F.linear(x, self.delta(1).to(x.dtype), self.bias)
            for e in range(2, lo + 1):
                y = y + F.linear(x, self.delta(e).to(x.dtype))
            return y
        return self._forward_mixed(x, k)

    def _forward_kernel(self, x: torch.Tensor, k: int | torch.Tensor, p) -> torch.Tensor:
        """The custom op on the kernel layout; no host synchronisation when k is on the device (module docstring)."""
        if isinstance(k, torch.Tensor):
            if k.shape != x.shape[:-1]:
                raise MoBiQuantError(f"per-token slice counts of shape {tuple(k.shape)} do not match tokens "
                                     f"{tuple(x.shape[:-1])}")
            if k.device.type == "cpu":  # given by the caller: checked here, for free
                lo, hi = (int(v) for v in torch.aminmax(k))
                self._check_k(lo)
                self._check_k(hi)
            kt = k.to(device=x.device, dtype=torch.int32)
        else:
            self._check_k(int(k))
            kt = torch.full(x.shape[:-1], int(k), dtype=torch.int32, device=x.device)
        if p is not None and p.trace is not None:
            B = torch.tensor(self._bits_of)
            p.trace.record(self.name, kt, B, self.in_features * self.out_features)
        P = self.packed(x.device)
        return torch.ops.mobiquant.sliced_linear(x, P.qweight, P.scale, P.zero, kt, self.bias, self.group_size)

    def _forward_mixed(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K), M = tokens
        kf = k.reshape(-1)  # (M,)
        if self.dense_cache:  # tokens grouped by k: one F.linear per precision present
            y = x2.new_empty(x2.shape[0], self.out_features)
            for kk in torch.unique(kf).tolist():
                idx = (kf == kk).nonzero().squeeze(1)
                y[idx] = self._dense_linear(x2[idx], kk)
        else:  # slice e only for the tokens with n_t >= e
            y = F.linear(x2, self.delta(1).to(x.dtype), self.bias)
            for e in range(2, int(kf.max()) + 1):
                idx = (kf >= e).nonzero().squeeze(1)
                y.index_add_(0, idx, F.linear(x2[idx], self.delta(e).to(x.dtype)))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dense_linear(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x Ŵ_kᵀ (+ bias) from the cached dense weight, computed in ``dense_dtype`` when one is set (the CPU app
        keeps fp16 weights: half the bytes a decode step reads). An output that overflows fp16 is computed again
        in x's dtype, so a large activation costs time, never an inf. A count in ``int4_slices`` runs the CPU int4
        kernel instead (bf16 products: fp32's range, nothing to recompute), unless autograd records the forward."""
        if k in self.int4_slices and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            return int4pack.int4_linear(x, self._int4_weight(k), self.bias)
        dt = self.dense_dtype or x.dtype
        if dt == x.dtype:
            return F.linear(x, self._dense_weight(k, dt, x.device), self.bias)
        bias = None if self.bias is None else self.bias.to(dt)
        x_dt = x.half() if dt is torch.float16 else x.to(dt)  # .half() / .float(): cheaper calls than .to(dtype)
        y = F.linear(x_dt, self._dense_weight(k, dt, x.device), bias)
        if not math.isfinite(y.abs().max()):  # an inf (or a NaN) anywhere; cheaper than an fp32 sum of fp16 values
            return F.linear(x, self._dense_weight(k, x.dtype, x.device), self.bias)
        return y.float() if x.dtype is torch.float32 else y.to(x.dtype)

    def _dense_weight(self, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (k, dtype, device)
        W = self._dense.get(key)
        if W is None:
            W = self._dense[key] = self.weight_k(k).to(device=device, dtype=dtype)
        return W

    def _int4_weight(self, k: int) -> int4pack.Int4Weight:
        W = self._int4.get(k)
        if W is None:
            Q = slices.combine([self.codes(e).cpu() for e in range(1, k + 1)], self.slice_bits)
            s_k, Z_k = slices.affine_params(self.scale.float().cpu(), self.zero.float().cpu(), self.slice_bits, k)
            W = self._int4[k] = int4pack.pack_int4(Q, s_k, Z_k, self.precisions[k - 1], self.group_size)
        return W

    def dense_cache_bytes(self) -> int:
        """Bytes of the cached weights: dense ones and int4 ones."""
        return (sum(W.numel() * W.element_size() for W in self._dense.values())
                + sum(W.nbytes for W in self._int4.values()))

    # ---------------------------------------------------------------- housekeeping
    def _clear_caches(self) -> None:
        self._dense.clear()
        self._int4.clear()
        self._packed.clear()

    def _apply(self, fn, recurse=True):
        self._clear_caches()  # moved or cast: rebuild on demand
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, slice_bits={self.slice_bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def set_dense_cache_(model: nn.Module, enabled: bool, *, build: bool = False,
                     dtype: torch.dtype | None = None, int4: bool = False) -> nn.Module:
    """Turn the per-precision dense weight cache of every MoBiQuantLinear on or off (off frees it).

    dtype: the dense path's compute dtype (weights cached and products computed in it, inputs cast to it and the
    output cast back; an fp16 output that overflows is recomputed in the input's dtype). None keeps each call's own
    dtype. fp16 halves the bytes a CPU decode step reads (the playground uses it); Ŵ_k differs from fp32 by fp16
    rounding. build=True fills the cache now for every precision, so that the first token at a new budget does not
    pay for unpacking a whole model's weights (an interactive server wants this).

    int4=True (CPU): the precisions of at most 4 bits (k = 1, 2 of 2,2,2,2; k = 1, 2 of 3,1,1,1,1,1) are cached as
    torch's int4 weight (quant/int4pack.py: codes unchanged, scale and zero in bf16, 4.5 bits per weight at group
    size 64) and computed with ``torch._weight_int4pack_mm_for_cpu`` from bf16 activations, the output cast back;
    the other precisions keep the dense weight in ``dtype``. Ŵ_k then differs from fp32 by bf16 rounding of its
    scale and zero point and of the activations and outputs. A layer the kernel does not fit (out_features % 16,
    group size not 32/64/128/256) keeps the dense path, and so does every layer, with a warning, where this torch
    has no working int4 kernel (``int4pack.available()``). Inputs on another device, or recorded by autograd,
    always take the dense path."""
    float_params = [p for p in model.parameters() if p.is_floating_point()]
    build_dtype = dtype or (float_params[0].dtype if float_params else torch.float32)
    use_int4 = enabled and int4 and int4pack.available()
    if enabled and int4 and not use_int4:
        warnings.warn("this torch has no working CPU int4 matmul (torch._weight_int4pack_mm_for_cpu): the dense "
                      f"weight cache keeps every precision in {build_dtype}", RuntimeWarning, stacklevel=2)
    for m in model.modules():
        if isinstance(m, MoBiQuantLinear):
            m.dense_cache, m.dense_dtype = enabled, dtype if enabled else None
            m.int4_slices = frozenset()
            if use_int4 and int4pack.fits(m.out_features, m.in_features, m.group_size):
                m.int4_slices = frozenset(k for k, b in enumerate(m.precisions, start=1) if b <= 4)
            m._clear_caches()
            if enabled and build:
                on_cpu = m.plane_1.device.type == "cpu"
                for k in range(1, m.num_slices + 1):
                    if on_cpu and k in m.int4_slices:
                        m._int4_weight(k)
                    else:
                        m._dense_weight(k, build_dtype, m.plane_1.device)
    return model
