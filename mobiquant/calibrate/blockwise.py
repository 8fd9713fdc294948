"""Block-wise calibration in the OmniQuant style (paper §4.2, Algorithm 1; paper-notes §5).

    X_fp = X_q = inputs of block 0 on the calibration tokens                       (N, L, D)
    for each decoder block ℓ:
        T = block_ℓ(X_fp) with full-precision weights                                # target
        stage 1 (clip):  learn each linear's base-slice clipping (sigmoid(γ), sigmoid(β) per group; floor with a
                         straight-through estimator), base slice only: MSE(block_ℓ(X_q), T)
        stage 2 (route): train the routers (and refine the clipping) on the routed mixture of slices, hard nested
                         masks with a straight-through estimator, budget term; a target budget is drawn per step
        freeze ℓ (MoBiQuantLinear + MoBiRoute); on held-out samples, fit τ for a grid of budgets, each with the
                         blocks upstream at that budget (H_b = quantized block_ℓ(H_b) at b)
        X_fp = T;  X_q = quantized block_ℓ(X_q) at the middle budget  (next_input="quantized"; "fp": X_q = T)
    each linear's cost curve on ``fisher_tokens`` calibration tokens (fisher.py): the "fisher" allocation

Choices where the paper is silent (README, "Calibration"):

* Router training threshold: within each batch τ is the quantile of the current scores that realizes the step's
  target budget (bisection), so the hard masks meet the budget exactly; the target is drawn uniformly from
  [B_1, B_E] every step. The router therefore learns a *ranking* of tokens that holds at every budget, which is what
  the run-time budget -> threshold map needs ("one calibration, any budget"). The budget term
  ((soft bits - target) / (B_E - B_1))² keeps the soft masks (the STE's backward) centred on that threshold.
* Thresholds: τ is fitted on held-out calibration samples (``holdout``, 25 %), not on the samples the routers were
  trained on (trained-on tokens score higher), at every budget of a grid (each B_k and the midpoints), with the
  upstream blocks running at that budget: their precision changes the activations a router sees, and fitting all
  budgets on one upstream precision missed the target by up to 0.2 bits.
* Router warm start (before stage 2): each router first regresses the standardized log of each residual slice's
  per-token benefit for its own linear, ||x (W - Ŵ_{e-1})ᵀ||² - ||x (W - Ŵ_e)ᵀ||² (a cheap local signal, 100
  full-batch steps on up to ``warm_tokens`` tokens: 2048, or 512 for ``fast()``); the block-level STE steps that
  follow are too few on a CPU to train a router from scratch (an untrained router routed no better than random).
  512 tokens cost the fast recipe little (WikiText-2, 8 windows, 2,2,2,2: 179.0 / 41.73 / 31.43 / 30.17
  at 3 / 4 / 5 / 6 bits against 172.2 / 41.79 / 31.87 / 30.10 with 2048: +4 % at 3 bits, equal above) and cut its
  calibration 168.8 -> 132.8 s.
* Stage 2 refines the clipping (``refine_clip``). Measured on the fast recipe with 512 cost-curve tokens: without
  it (routers only) 25 s quicker, 223.2 / 41.02 / 31.42 / 29.96 at 3 / 4 / 5 / 6 bits against 202.5 / 40.79 / 31.89 /
  30.30 with it: worse at 3 bits, where most tokens run on the base slice. 512 cost-curve tokens instead of 1024
  (same runs against the 179.0 above) also cost the 3-bit point, so both stay.
* Speed: stage 2 runs the routed mixture as one matmul over tokens grouped by slice count, with a hand-written
  backward (``mixture.py``: E + 2 matmuls per linear and step instead of 3E), and the E reconstructions Ŵ_k come from
  one pass with a written-out straight-through backward (``quant/slices.fake_quantize_ste``).
* Loss: stage 1, block-output MSE normalised by the target's mean square (OmniQuant); stage 2, the per-token relative
  error e = mean_t |y_t - T_t|² / |T_t|² (what the next RMSNorm sees; plain MSE let the few massive-activation tokens
  decide every routing choice), + budget_weight x mean budget term over linears. The warm start's benefit is relative
  for the same reason.
* Stage 2 steps on log(e) (``balance_budgets``): e at a 3-bit draw is tens of times e at a 6-bit draw, so the plain
  sum fitted the shared clipping to the lowest budgets. Measured on the H100 (full recipe, WikiText-2, 32 windows,
  3,1,1,1,1,1, at 3 / 4 / 5 / 6 bits): plain 98.65 / 29.79 / 25.62 / 24.73, balanced 105.49 / 29.67 / 25.53 / 24.50
  (seed 1: 117.25 / 29.74 / 25.29 / 24.54) against bit-specific 121.71 / 35.90 / 26.70 / 24.42; 2,1,1,1,1,1,1
  went 82.12 -> 69.65 at 3 bits and 25.38 -> 25.16 at 6; 2,2,2,2 got better at 4 bits and slightly worse at 3, 5
  and 6 (131.23 / 32.71 / 26.66 / 25.45 against 127.74 / 33.19 / 26.42 / 25.27). The 3-bit point moves by ±10 %
  between seeds, the 6-bit point by about 0.2 %. The app's ``fast()`` recipe, 2,2,2,2, CPU, 8 windows: 172.3 / 41.82 /
  31.57 / 30.00 against 179.0 / 41.73 / 31.43 / 30.17 without it.
* Router: hidden width 16, SiLU, input divided by the per-channel RMS of the calibration inputs; AdamW.
* Learning rates: clipping 5e-2, routers 5e-3, weight decay 0. OmniQuant's lwc_lr (1e-3..1e-2) is meant for
  thousands of steps per block (128 samples x 20 epochs); a CPU recipe has tens, so the clipping rate is higher.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..api import decoder_layers, replace_module, target_linears
from ..config import MoBiQuantConfig
from ..errors import MoBiQuantError
from ..nn.linear import MoBiQuantLinear
from ..nn.router import MoBiRoute, ste_nested_mask, threshold_for_bits
from ..precision import precision
from ..quant import slices
from ..route import attach_thresholds_
from .data import calibration_tokens
from .fisher import fit_fisher_
from .mixture import routed_mixture


@dataclass(frozen=True)
class CalibConfig:
    """How to calibrate. ``fast()`` is the recipe the app runs on first launch."""

    calib: str = "self"  # "self", a text file, or "dataset:NAME[:CONFIG[:SPLIT]]"
    samples: int = 24  # 24 x 256 tokens, 2 epochs: 5.2 min for SmolLM2-135M, slices 2,2,2,2, 2 CPU cores
    seqlen: int = 256
    epochs: int = 2  # per stage
    batch_size: int = 2
    lr_clip: float = 5e-2
    lr_router: float = 5e-3
    budget_weight: float = 0.1
    temperature: float = 1.0
    next_input: str = "quantized"  # "quantized" (OmniQuant) or "fp"
    stages: tuple[str, ...] = ("clip", "route")
    holdout: float = 0.25  # fraction of samples kept out of training; their router scores set the thresholds
    refine_clip: bool = True  # stage 2 also trains the clipping (False: stage 2 trains the routers only)
    balance_budgets: bool = True  # stage 2 steps on log(error): every drawn budget counts by its relative error
    warm_start: bool = True  # pre-train routers on each slice's local per-token benefit before stage 2
    warm_steps: int = 100  # full-batch Adam steps of each router's warm start
    warm_tokens: int = 2048  # tokens of the warm start's regression (a seeded sample of the FP-pass inputs)
    fisher_tokens: int = 1024  # calibration tokens that measure each linear's cost curve (fisher.py); 0: none
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.seqlen < 8 or self.epochs < 1 or self.batch_size < 1:
            raise MoBiQuantError("samples, epochs and batch size must be >= 1 and seqlen >= 8")
        if self.next_input not in ("quantized", "fp"):
            raise MoBiQuantError(f"next_input must be 'quantized' or 'fp', got {self.next_input!r}")
        if not set(self.stages) <= {"clip", "route"} or not self.stages:
            raise MoBiQuantError(f"stages must be a non-empty subset of ('clip', 'route'), got {self.stages}")
        if self.warm_steps < 1 or self.warm_tokens < 1:
            raise MoBiQuantError("warm_steps and warm_tokens must be >= 1")
        if self.fisher_tokens < 0:
            raise MoBiQuantError(f"fisher_tokens must be >= 0, got {self.fisher_tokens}")
        if not 0 <= self.holdout < 1:
            raise MoBiQuantError(f"holdout must be in [0, 1), got {self.holdout}")

    @classmethod
    def fast(cls, **kw) -> CalibConfig:
        return cls(**({"samples": 16, "seqlen": 128, "epochs": 1, "warm_tokens": 512} | kw))


class CalibLinear(nn.Module):
    """Training-time stand-in for one linear: frozen W, learnable clipping, and a router.

    mode "clip":   y = x Ŵ_1ᵀ (base slice; STE through floor)
    mode "route":  y = x Ŵ_1ᵀ + Σ_{e ≥ 2} m_e x ΔŴ_eᵀ, m = nested STE masks at the batch threshold for ``budget``
    mode "fp":     y = x Wᵀ, accumulating the per-channel mean square of x (the router's input scale)
    """

    def __init__(self, linear: nn.Linear, config: MoBiQuantConfig):
        super().__init__()
        self.linear = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        N, K = linear.weight.shape
        self.slice_bits, self.group_size = config.slice_bits, config.group_size_for(K)
        G = K // self.group_size
        init = torch.full((N, G), 4.0, device=linear.weight.device)  # sigmoid(4) ≈ 0.982: OmniQuant's init
        self.gamma, self.beta = nn.Parameter(init.clone()), nn.Parameter(init.clone())
        E = len(self.slice_bits)
        self.router = MoBiRoute(K, E, config.router_hidden, device=linear.weight.device) if E > 1 else None
        self.mode, self.budget, self.temperature = "fp", float(sum(self.slice_bits)), 1.0
        self.budget_loss = torch.zeros(())
        self.sumsq, self.count = torch.zeros(K, device=linear.weight.device), 0
        self.inputs: list[torch.Tensor] = []  # a sample of FP-pass inputs, for the router's warm start
        self.scores: list[torch.Tensor] | None = None  # when a list, route mode appends the batch's scores
        self.frozen_weights: list[torch.Tensor] | None = None  # [Ŵ_k], cached while the clipping is frozen

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.gamma), torch.sigmoid(self.beta)

    def weights(self, k_max: int) -> list[torch.Tensor]:
        """[Ŵ_1 .. Ŵ_kmax], differentiable w.r.t. the clipping while it trains; computed once while it is frozen."""
        if self.gamma.requires_grad:
            return self._fake_quantize(k_max)
        if self.frozen_weights is None or len(self.frozen_weights) < k_max:
            with torch.no_grad():
                self.frozen_weights = self._fake_quantize(k_max)
        return self.frozen_weights[:k_max]

    def _fake_quantize(self, k_max: int) -> list[torch.Tensor]:
        cmax, cmin = self.clip_factors()
        s_1, z_1 = slices.base_qparams(self.linear.weight, self.group_size, self.slice_bits[0], cmax, cmin,
                                       storage_dtype=None)
        return slices.fake_quantize_ste(self.linear.weight, s_1, z_1, self.slice_bits, range(1, k_max + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.linear.bias
        if self.mode == "fp":
            flat = x.detach().float().reshape(-1, x.shape[-1])
            self.sumsq += flat.pow(2).sum(0)
            self.count += flat.shape[0]
            self.inputs.append(flat[:: max(1, flat.shape[0] // 512)])
            return self.linear(x)
        if self.mode == "clip" or self.router is None:
            return F.linear(x, self.weights(1)[0].to(x.dtype), b)
        E = len(self.slice_bits)
        scores = self.router(x)  # (..., E-1)
        if self.scores is not None:
            self.scores.append(scores.detach().reshape(-1, E - 1))
        tau = threshold_for_bits(scores.detach().reshape(-1, E - 1), self.slice_bits, self.budget)
        m = ste_nested_mask(scores, tau, self.temperature)  # (..., E-1), hard nested 0/1 forward
        y = routed_mixture(x, m.to(x.dtype), [Wk.to(x.dtype) for Wk in self.weights(E)])  # Σ_e m_e x ΔŴ_eᵀ
        y = y if b is None else y + b
        soft = torch.cumprod(torch.sigmoid((scores - tau) / self.temperature), dim=-1)
        soft_bits = self.slice_bits[0] + (soft * torch.tensor(self.slice_bits[1:], device=x.device)).sum(-1).mean()
        self.budget_loss = ((soft_bits - self.budget) / (sum(self.slice_bits) - self.slice_bits[0])) ** 2
        return y

    @torch.enable_grad()
    def warm_start_router(self, steps: int = 100, lr: float = 1e-2, tokens: int = 2048) -> float:
        """Regress the router's scores on the standardized log-benefit of each residual slice for each token,
        log(||x (W - Ŵ_{e-1})ᵀ||² - ||x (W - Ŵ_e)ᵀ||²): a local, cheap signal that gives stage 2 a router that
        already ranks tokens by how much a slice helps them (the block-level STE steps alone are too few on a CPU).
        Returns the final regression loss."""
        if self.router is None or not self.inputs:
            return float("nan")
        X = torch.cat(self.inputs)
        X = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:tokens]]  # (M, K)
        with torch.no_grad():
            W = self.linear.weight.float()
            err = torch.stack([(X @ (Wk - W).T).pow(2).sum(-1) for Wk in self.weights(len(self.slice_bits))])  # (E, M)
            err = err / (X @ W.T).pow(2).sum(-1).clamp_min(1e-12)  # relative: the next RMSNorm divides by |y_t|
            target = torch.log((err[:-1] - err[1:]).clamp_min(1e-12)).T  # (M, E-1)
            target = (target - target.mean(0)) / target.std(0).clamp_min(1e-6)
        X = X / self.router.input_scale.float()  # normalised once, not at every step
        opt = torch.optim.Adam(self.router.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(self.router.mlp(X), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.inputs = []
        return loss.item()

    def to_quantized(self, name: str) -> MoBiQuantLinear:
        cfg = MoBiQuantConfig(slice_bits=self.slice_bits, group_size=self.group_size)
        with torch.no_grad():
            cmax, cmin = self.clip_factors()
            q = MoBiQuantLinear.from_linear(self.linear, cfg, cmax, cmin)
        q.name = name
        if self.router is not None and self.scores:
            q.router = self.router
            q.router.set_calibration_scores_(torch.cat(self.scores))
        return q


# ------------------------------------------------------------------------------------------------ block plumbing
class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, batch: int):
    """Inputs of block 0 for every calibration sample, (N, L, D), and the other block kwargs (rotary embeddings,
    masks) captured from a batch of one so that they broadcast over any batch."""
    store: dict = {}

    def hook(module, args, kwargs):
        store["x"] = args[0] if args else kwargs["hidden_states"]
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        xs = []
        for i in range(0, tokens.shape[0], batch):
            try:
                model(input_ids=tokens[i : i + batch].to(device), use_cache=False)
            except _StopForward:
                xs.append(store["x"].detach())
        try:
            model(input_ids=tokens[:1].to(device), use_cache=False)
        except _StopForward:
            kwargs = store["kwargs"]
    finally:
        handle.remove()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    return torch.cat(xs), kwargs


def _run(layer: nn.Module, X: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    outs = []
    for i in range(0, X.shape[0], batch):
        out = layer(X[i : i + batch], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def _block_loss(layer, calib: dict[str, CalibLinear], x, t, kwargs: dict, cfg: CalibConfig):
    out = layer(x, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    routed = [c for c in calib.values() if c.mode == "route" and c.router is not None]
    if not routed:  # stage 1: OmniQuant's block MSE (normalised so blocks of any scale train alike)
        return F.mse_loss(y.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
    # stage 2: per-token relative error, as the next block's RMSNorm sees it; plain MSE would let the few
    # massive-activation tokens decide every routing choice
    loss = ((y.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1).clamp_min(1e-12)).mean()
    if cfg.balance_budgets:  # d log(e) = de / e: a step at 6 bits moves the clipping as much as one at 3 bits
        loss = loss / loss.detach().clamp_min(1e-12)
    return loss + cfg.budget_weight * torch.stack([c.budget_loss for c in routed]).mean()


def _train_stage(layer, calib, stage: str, X, T, kwargs, cfg: CalibConfig, rng: random.Random) -> float:
    B = calib[next(iter(calib))].slice_bits
    low, high = B[0], sum(B)
    clip = stage == "clip" or cfg.refine_clip
    for c in calib.values():
        c.gamma.requires_grad_(clip)
        c.beta.requires_grad_(clip)
        c.frozen_weights = None
    params = [{"params": [p for c in calib.values() for p in (c.gamma, c.beta)], "lr": cfg.lr_clip}] if clip else []
    if stage == "route":
        params.append({"params": [p for c in calib.values() if c.router is not None for p in c.router.parameters()],
                       "lr": cfg.lr_router})
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    for c in calib.values():
        c.mode, c.temperature = stage, cfg.temperature
    n, last = X.shape[0], float("nan")
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            budget = rng.uniform(low, high)
            for c in calib.values():
                c.budget = budget
            loss = _block_loss(layer, calib, X[idx], T[idx], kwargs, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
    return last


def threshold_grid(precisions: list[int]) -> list[float]:
    """Budgets at which τ is fitted: every B_k and the midpoints between neighbours."""
    grid = {float(b) for b in precisions}
    grid |= {(a + b) / 2 for a, b in zip(precisions, precisions[1:])}
    return sorted(grid)


def calibrate_(model: nn.Module, tokenizer, config: MoBiQuantConfig | None = None, calib: CalibConfig | None = None,
               *, tokens: torch.Tensor | None = None, progress: bool = True) -> nn.Module:
    """Calibrate a full-precision causal LM in place: its decoder linears become MoBiQuantLinear with calibrated
    clipping and (with more than one slice) routers plus the budget -> threshold table. Returns the model, with
    ``model.mobiquant_calibration`` = {config, seconds, per-block losses}."""
    config, calib = config or MoBiQuantConfig(), calib or CalibConfig()
    if config.allocation == "fisher" and not calib.fisher_tokens and config.num_slices > 1:
        raise MoBiQuantError("the fisher allocation needs the cost curves: set fisher_tokens > 0 or another allocation")
    t_start = time.perf_counter()
    all_linears = target_linears(model, config)  # validates the modules and every group size before any work
    for lin in all_linears.values():
        config.group_size_for(lin.in_features)
    if tokens is None:
        tokens = calibration_tokens(model, tokenizer, calib.calib, calib.samples, calib.seqlen, calib.seed,
                                    progress=progress)
    torch.manual_seed(calib.seed)
    rng = random.Random(calib.seed)
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    X_fp, kwargs = capture_block_inputs(model, layers, tokens, calib.batch_size)
    X_q = X_fp
    n_hold = round(calib.holdout * X_fp.shape[0]) if X_fp.shape[0] > 1 else 0
    train, hold = slice(0, X_fp.shape[0] - n_hold), slice(X_fp.shape[0] - n_hold if n_hold else 0, None)
    losses = []
    mid = (config.precisions[0] + config.precisions[-1]) / 2
    routed = "route" in calib.stages and config.num_slices > 1
    grid = threshold_grid(config.precisions) if routed else []
    H = {b: X_fp[hold] for b in grid}  # held-out streams, one per grid budget
    bar = tqdm(list(enumerate(layers)), desc="calibrating blocks", disable=not progress)
    for i, layer in bar:
        names = {n: lin for n, lin in all_linears.items() if n.startswith(f"{prefix}.{i}.")}
        calib_mods = {n: CalibLinear(lin, config) for n, lin in names.items()}
        for n, c in calib_mods.items():
            replace_module(model, n, c)
        with torch.no_grad():
            T = _run(layer, X_fp, kwargs, calib.batch_size)  # FP targets; mode "fp" also gathers input scales
        for c in calib_mods.values():
            if c.router is not None:
                c.router.input_scale.copy_((c.sumsq / max(c.count, 1)).sqrt().clamp_min(1e-6))
        block_losses = {}
        with torch.enable_grad():
            for stage in calib.stages:
                if stage == "route" and calib.warm_start:
                    warm = [c.warm_start_router(calib.warm_steps, tokens=calib.warm_tokens)
                            for c in calib_mods.values()]
                    block_losses["warm"] = sum(warm) / len(warm)
                block_losses[stage] = _train_stage(layer, calib_mods, stage, X_q[train], T[train], kwargs, calib,
                                                   rng)
        with torch.no_grad():  # router scores of the calibration tokens: the budget -> threshold table
            for c in calib_mods.values():
                c.mode, c.budget, c.scores = "route", mid, []
                c.requires_grad_(False)  # trained: weights() now reconstructs each Ŵ_k once, not per batch
                if c.router is not None:  # fp16 storage keeps routers under 2 % of a checkpoint; score with it
                    c.router.half()
            _run(layer, X_q[hold], kwargs, calib.batch_size)
        quantized = {n: c.to_quantized(n) for n, c in calib_mods.items()}
        for n, q in quantized.items():
            replace_module(model, n, q)
        with torch.no_grad():
            fits = {}
            for b in grid:  # one batch: one τ per layer over all held-out tokens
                fits[b] = {}
                with precision(budget=b, fit=fits[b]):
                    H[b] = _run(layer, H[b], kwargs, H[b].shape[0])
            for n, q in quantized.items():
                if q.router is not None and grid:
                    q.router.tau_bits = torch.tensor(grid, dtype=torch.float32)
                    q.router.tau = torch.tensor([fits[b][n] for b in grid], dtype=torch.float32)
        if calib.next_input == "quantized":
            with torch.no_grad(), precision(budget=mid if routed else None):
                X_q = _run(layer, X_q, kwargs, calib.batch_size)
        else:
            X_q = T
        X_fp = T
        losses.append(block_losses)
        bar.set_postfix({s: f"{v:.4f}" for s, v in block_losses.items()})
    model.mobiquant_config = config
    if any(m.router is not None for m in model.modules() if isinstance(m, MoBiQuantLinear)):
        if calib.fisher_tokens:  # after the last block: the cost curves need the whole quantized model
            n = min(tokens.shape[0], -(-calib.fisher_tokens // tokens.shape[1]))
            fit_fisher_(model, tokens[:n], calib.batch_size, progress)
        attach_thresholds_(model, config.thresholds, config.allocation)
    model.mobiquant_calibration = {"calib": calib, "seconds": time.perf_counter() - t_start, "losses": losses}
    return model
