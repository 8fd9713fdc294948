"""Fast decode engine for HF LLaMA-family models (LLaMA, Mistral, Qwen2): static KV cache, the one-token decode step
captured once in a CUDA graph, routing and budget on the device (issue #5, deliverable 4; gpt-fast's design).

    eng = DecodeEngine(model, max_seq_len=1024)          # model on CUDA, quantized (or not: the fp16 baseline)
    eng.set_budget(4.0)                                  # device tensors only: no recapture, no recompilation
    logits, counts = eng.prefill(ids)                    # ids (T,) long; counts (T, n_linears) int32
    logits, counts = eng.decode()                        # one graph replay: the greedy token of the last step
    eng.set_budget(2.5); eng.decode(token_id)            # next token at 2.5 bits, or a token chosen by the caller

The engine runs the HF model's own modules and weights (embeddings, RMSNorm, activation, rotary tables, lm_head)
through its own forward, so that every shape is static and nothing leaves the device:

* **KV cache**: (layers, kv heads, max_seq_len, head_dim) tensors written with ``index_copy_`` at the position held in
  a device tensor; decode attends over the whole cache with a mask ``j <= pos`` (and the sliding window, if any).
* **Linears**: a quantized linear runs ``torch.ops.mobiquant.sliced_linear`` (the Triton kernels, mobiquant/ops.py)
  with its per-token slice count as a device tensor; an ``nn.Linear`` runs ``F.linear`` (the fp16 engine).
  A quantized linear outside the kernels' constraints (mobiquant/ops.py ``kernel_compatible``) is not served on
  CUDA (``supported`` says why; elastic_generate then keeps the HF path). Without the kernels (the CPU, where tests
  run the same forward eagerly, or ``use_kernels=False``) each quantized linear runs its E dense per-precision
  weights and picks each token's result on the device: E products and E dense weights in memory.
* **Routing**: the routers of linears that share an input (q/k/v, o, gate/up, down) run as one fused launch at
  decode (``torch.ops.mobiquant.route_counts``: MLPs, thresholds, nested counts); prefill runs the same function in
  torch. Thresholds come from a device table τ[p, linear] over a grid of budgets (every 1/8 bit from B_1 to B_E),
  filled at construction from each model's ``ThresholdTable`` (route.py) in its "layer" form; ``set_budget`` copies
  the budget's row into static device buffers that the step reads (device-to-device copies: no lookup launches in
  the step, no recapture). A budget between grid points uses the nearest grid budget (at most 1/16 bit away). The
  "band" allocation is a second device table (slices forced on / off per grid budget). A "fisher" checkpoint runs
  here with the uniform band: its per-linear shares of the budget are not on the device yet.
  **Not graphable**: the "adaptive" threshold mode (a Python-side history of the text's scores, re-thresholded every
  64 tokens); the engine uses the layer thresholds fitted at calibration for a model attached in that mode, so its
  realized bits follow the calibration text rather than the user's.
* **Fused decode step** (``fuse_glue``, on by default with the kernels for fp16/bf16 LLaMA-shaped blocks): the glue
  between the linears runs as 5 launches per block instead of ~40 (``mobiquant.kernels.decode_step`` through
  mobiquant/ops.py: residual add + RMSNorm, rotary + cache write, attention over the valid cache slots, SiLU·up),
  and ``fuse_linears`` runs q/k/v and gate/up as one launch each (``sliced_linear_multi``), each linear still at
  its own slice count. Prefill keeps the torch glue. KERNEL_NOTES.md ("decode step") has the profile.
  ``fuse_router`` (on by default for fp16 with ``fuse_linears``): a routed group's router launch only stores its
  fc1 partials, and the linear's v7 launch after it finishes the counts in each program (the router kernel's own
  finishing code, so the counts equal ``route_counts``'), which takes the router's tail off the step's critical
  path (KERNEL_NOTES.md, "fused router"). ``router_glue`` (on with ``fuse_router``): the router launches of q/k/v
  and gate/up also compute the norm before them, and down_proj's SiLU·up (router.py's prologue, bit for bit the glue
  kernels' results), so a routed block launches two glue kernels (rotary + cache write, attention) instead of five.
  ``fuse_rope`` (on with ``router_glue``): the q/k/v launch also rotates q and k and writes k and v into the cache
  (``sliced_gemv_cc(..., rope=)``, bit for bit rope_kv's results) where its tiles hold whole heads, so the
  attention is the one glue kernel left (KERNEL_NOTES.md, "Fifteenth session"). ``attention_router`` (on with
  ``router_glue`` where heads are a power of two from 16 to 256 features, 128 with int8 activations): the
  attention's programs also store o_proj's router partials over their head and its int8 codes
  (``router.route_attention``), so o_proj's router is not launched (KERNEL_NOTES.md, "Seventeenth session").
  ``int8_activations`` (off by default; it changes the numerics): with the fused router, the router launch also
  rounds its input to int8 per group of 128 (kernels/act_int8.py) and the linear after it runs the int8 tensor-core
  path (``sliced_gemv_cc(..., x_int8=)``). WikiText-2 perplexity of the embedded model rose 0.4-0.5 % at 4, 6 and 8
  bits with every linear's input rounded so (benchmarks/results/int8_act_ppl_cpu.json). Groups that are not routed
  keep fp16 inputs.
* ``norm_fold`` (on where it fits: int8 activations, ``attention_router``, every group routed, o_proj and down_proj
  on tiles of 128 rows): where no count is routed (``set_k``, ``set_counts``, the forced budgets B_1 and B_E), the
  step runs from a second graph in which o_proj and down_proj add their output to the residual stream and compute
  the next norm's int8 codes in their tiles' last splits (``router.norm_fold``; the group after them applies the
  norm's 1 / rms to its sums), so the q/k/v (past the first block) and gate/up router launches are not launched. The
  numerics differ from the router launches' only in roundings (the codes come from w * h in fp32, not from the fp16
  x). Routed budgets keep the first graph: there the folds measured slower (KERNEL_NOTES.md, "Twenty-first
  session").
* ``head_slices`` (off by default; it changes the numerics): lm_head sliced like the linears at construction (the
  model's slices, no router) and run at that many slices; 0.37 -> 0.16 ms a step at 3 slices for LLaMA-3-8B's head
  on an H100, +0.8-2.1 % WikiText-2 perplexity at 6 bits and +0.1-0.3 % at 8 on the embedded model
  (benchmarks/experiments/head_ppl.py; KERNEL_NOTES.md, "Sixteenth session"). The fused step ends with
  ``greedy_step``: the fp32 logits, the greedy token and the next position in one launch.
* **Modes**: ``set_budget`` (routers), ``set_k`` (uniform) and ``set_counts`` (counts given per linear, e.g. the
  random baseline drawn on the host exactly as the torch path draws them) only write device tensors.

``decode`` replays the captured graph (``capture=True``, the default on CUDA): the graph reads the input token and
position from device buffers, writes fp32 logits, every linear's slice count, the greedy next token, and advances
the position, so consecutive greedy steps need no host work at all (``decode()``) and sampling costs one copy of the
logits (``decode(token_id)`` writes the caller's token first).
"""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import MoBiQuantConfig
from .errors import MoBiQuantError
from .nn.linear import MoBiQuantLinear
from .route import ThresholdTable, forced_count
from .trace import _LINEAR_ORDER, split_name

GRID = 8  # budget grid of the threshold table: every 1/GRID bit
FAMILIES = ("llama", "mistral", "qwen2")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def supported(model, use_kernels: bool | None = None) -> str | None:
    """None if the engine can serve ``model``, else the reason (one line)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in FAMILIES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {FAMILIES}"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not len(layers) or not hasattr(model, "lm_head"):
        return "no model.model.layers / lm_head"
    rope = getattr(getattr(base, "rotary_emb", None), "rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"rope type {rope!r} depends on the sequence length"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or not all(hasattr(attn, n) for n in _ATTN) or \
                not all(hasattr(mlp, n) for n in _MLP):
            return "a decoder block is not LLaMA-shaped (q/k/v/o, gate/up/down, no q_norm)"
    dev = base.embed_tokens.weight.device
    use_kernels = (dev.type == "cuda" and ops.triton_available()) if use_kernels is None else use_kernels
    qs = [m for m in model.modules() if isinstance(m, MoBiQuantLinear)]
    if len({m.slice_bits for m in qs}) > 1:
        return "quantized linears with different slice lists"
    if use_kernels and any(not m.kernel_compatible for m in qs):
        return "a quantized linear does not fit the kernels (2-bit slices, E <= 4, K % 16, group % 32)"
    return None


class _Group:
    """Quantized linears of one block that share an input, and their routers stacked for one fused launch."""

    def __init__(self, idx: list[int], mods: list[MoBiQuantLinear], device):
        self.idx = torch.tensor(idx, dtype=torch.long, device=device)  # global linear indices
        self.lo, self.hi = idx[0], idx[-1] + 1  # contiguous by construction
        self.chunk = None  # in-features per router program at decode (None: the kernel's default)
        routers = [m.router for m in mods]
        self.routed = any(r is not None for r in routers)
        if not self.routed:
            return
        E = mods[0].num_slices
        K = mods[0].in_features
        H = max(r.fc1.out_features for r in routers if r is not None)
        R = len(mods)
        f32 = dict(dtype=torch.float32, device=device)
        self.s = torch.ones(R, K, **f32)
        self.w1 = torch.zeros(R, H, K, **f32)
        self.b1 = torch.zeros(R, H, **f32)
        self.w2 = torch.zeros(R, E - 1, H, **f32)
        self.b2 = torch.zeros(R, E - 1, **f32)
        for r, rt in enumerate(routers):  # a linear without router keeps zeros; its count is always "given"
            if rt is None:
                continue
            h = rt.fc1.out_features
            self.s[r] = rt.input_scale.float()
            self.w1[r, :h] = rt.fc1.weight.float()
            self.b1[r, :h] = rt.fc1.bias.float()
            self.w2[r, :, :h] = rt.fc2.weight.float()
            self.b2[r] = rt.fc2.bias.float()


class DecodeEngine:
    """Static-shape prefill / decode of a HF LLaMA-family model (module docstring)."""

    def __init__(self, model: nn.Module, max_seq_len: int = 1024, *, use_kernels: bool | None = None,
                 capture: bool | None = None, compile: bool = False, fuse_glue: bool | None = None,
                 fuse_linears: bool | None = None, fuse_router: bool | None = None, router_glue: bool | None = None,
                 int8_activations: bool = False, fuse_rope: bool | None = None, head_slices: int | None = None,
                 attention_router: bool | None = None, norm_fold: bool | None = None):
        reason = supported(model, use_kernels)
        if reason:
            raise MoBiQuantError(f"the decode engine cannot serve this model: {reason}")
        cfg = model.config
        base = model.model
        self.model, self.base, self.layers = model, base, base.layers
        self.device = base.embed_tokens.weight.device
        self.dtype = base.embed_tokens.weight.dtype
        self.use_kernels = (self.device.type == "cuda" and ops.triton_available()) if use_kernels is None \
            else use_kernels
        self.max_seq_len = int(max_seq_len)
        a0 = self.layers[0].self_attn
        self.head_dim = a0.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.scaling = a0.scaling
        window = getattr(cfg, "sliding_window", None)
        self.window = window if window and getattr(cfg, "use_sliding_window", True) and window < max_seq_len else None
        self.lock = threading.Lock()  # one generation at a time owns the cache
        fits = _glue_fits(model) and self.dtype in (torch.float16, torch.bfloat16)
        self.fuse_glue = (self.use_kernels and fits) if fuse_glue is None else bool(fuse_glue)
        if self.fuse_glue and not fits:
            raise MoBiQuantError("fuse_glue needs fp16/bf16 weights, RMSNorm norms and a SiLU MLP")
        # q/k/v and gate/up as one launch each in the fused decode step (the kernels only)
        self.fuse_linears = (self.fuse_glue and self.use_kernels) if fuse_linears is None else bool(fuse_linears)
        # routers finished inside the linear after them (fp16, one launch per group): router.route_partials + v7
        fits = self.fuse_linears and self.dtype == torch.float16 and not compile
        self.fuse_router = fits if fuse_router is None else bool(fuse_router)
        if self.fuse_router and not fits:
            raise MoBiQuantError("fuse_router needs fuse_linears, fp16 weights and no compile")
        # the fused router launch also computes its input (the norm before q/k/v and gate/up, SiLU·up before down),
        # so those glue kernels are not launched for a routed group
        self.router_glue = self.fuse_router if router_glue is None else bool(router_glue)
        if self.router_glue and not self.fuse_router:
            raise MoBiQuantError("router_glue needs the fused router (fuse_router)")
        # the rotary and the cache write done by the fused q/k/v launch (sliced_gemv_cc rope=) where its tiles hold
        # whole heads, so rope_kv is not launched
        self.fuse_rope = self.router_glue if fuse_rope is None else bool(fuse_rope)
        if self.fuse_rope and not self.router_glue:
            raise MoBiQuantError("fuse_rope needs router_glue (the fused router launches computing the norms)")
        self.int8_activations = bool(int8_activations)
        if self.int8_activations and not self.fuse_router:
            raise MoBiQuantError("int8_activations needs the fused router: the kernels on CUDA, fp16 weights, no "
                                 "compile")
        # o_proj's router partials (and int8 codes) in the attention's epilogue (router.route_attention): where its
        # heads are whole chunks of the router (a power of two from 16 to 256 features; 128 with int8 activations)
        dh = self.head_dim
        self._head_chunks = dh & (dh - 1) == 0 and 16 <= dh <= 256 and (dh == 128 or not self.int8_activations)
        self.attention_router = self.router_glue and self._head_chunks if attention_router is None \
            else bool(attention_router)
        if self.attention_router and not (self.router_glue and self._head_chunks):
            raise MoBiQuantError("attention_router needs router_glue and heads of a power of two from 16 to 256 "
                                 "features (128 with int8 activations)")
        self._norm_fold_asked = norm_fold
        self._all_given = True  # the mode in force routes no count (set_k, set_counts, a forced budget)
        dev = dict(device=self.device)
        with torch.no_grad():
            self._build_linears()
            self._build_int8_buffers()
            self._build_head(head_slices)
            L, S = len(self.layers), self.max_seq_len
            self.k_cache = torch.zeros(L, self.n_kv, S, self.head_dim, dtype=self.dtype, **dev)
            self.v_cache = torch.zeros_like(self.k_cache)
            pos = torch.arange(S, **dev)[None]
            cos, sin = base.rotary_emb(self.k_cache[0, 0, :1], pos)  # HF's own tables, for every position
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (S, head_dim)
            self._build_routing()
            self._build_norm_fold()
            # static buffers of the decode step
            self.tok = torch.zeros(1, dtype=torch.long, **dev)
            self.pos = torch.zeros(1, dtype=torch.long, **dev)
            self.logits = torch.zeros(cfg.vocab_size, dtype=torch.float32, **dev)
            self.counts_out = torch.ones(max(self.n_linears, 1), dtype=torch.int32, **dev)
            self._kv_pos = torch.arange(S, **dev)
            if self.fuse_glue:  # greedy_step's partial maxima and counter (static: the graph holds them)
                self._greedy_ws = ops.greedy_workspace(cfg.vocab_size, self.device)
        self.graph = self.graph_fold = None  # the step's graph, and the folded one of the all-given modes (norm_fold)
        self.captures = 0  # graphs captured so far (a budget change must not add one)
        self._step = torch.compile(self._decode_body, fullgraph=False) if compile else self._decode_body
        if capture if capture is not None else self.device.type == "cuda":
            self.capture()

    # ------------------------------------------------------------------------------------------ construction
    def _build_linears(self) -> None:
        self.names, self.quant = [], []  # quantized linears, global order (block by block, q k v o gate up down)
        self.blocks = []  # per block: dict leaf -> (module, global index or None)
        for layer in self.layers:
            mods = {n: getattr(layer.self_attn, n) for n in _ATTN} | {n: getattr(layer.mlp, n) for n in _MLP}
            entry = {}
            for leaf, m in mods.items():
                if isinstance(m, MoBiQuantLinear):
                    entry[leaf] = (m, len(self.quant))
                    self.quant.append(m)
                    self.names.append(m.name or leaf)
                else:
                    entry[leaf] = (m, None)
            self.blocks.append(entry)
        self.n_linears = len(self.quant)
        self.packed = {}  # global index -> PackedSlices (the engine holds them: the graph captures their pointers)
        self.dense = {}  # global index -> [Ŵ_1..Ŵ_E] (torch path, CPU)
        for j, m in enumerate(self.quant):
            if self.use_kernels:
                self.packed[j] = m.packed(self.device)
            else:
                self.dense[j] = [m._dense_weight(k, self.dtype, self.device) for k in range(1, m.num_slices + 1)]

    def _build_head(self, head_slices: int | None) -> None:
        """``head_slices`` (an option that changes the numerics; None: lm_head in the model's precision): lm_head
        sliced like the quantized linears (same slices, same group size for its input width, no router,
        ``MoBiQuantLinear.from_linear``) and run at that fixed count, on the kernels where they run."""
        self.head_slices = head_slices
        if head_slices is None:
            return
        head = self.model.lm_head
        if not isinstance(head, nn.Linear):
            raise MoBiQuantError(f"head_slices needs an nn.Linear lm_head, not {type(head).__name__}")
        K = head.in_features
        same_k = [m for m in self.quant if m.in_features == K]
        bits = self.quant[0].slice_bits if self.quant else MoBiQuantConfig().slice_bits
        group = same_k[0].group_size if same_k else None
        config = MoBiQuantConfig(slice_bits=bits, group_size=group)
        if isinstance(head_slices, bool) or not isinstance(head_slices, int) or not 1 <= head_slices <= len(bits):
            raise MoBiQuantError(f"head_slices={head_slices}: the slices {bits} give 1..{len(bits)}")
        q = MoBiQuantLinear.from_linear(head, config)  # sliced on lm_head's device
        if self.use_kernels and not q.kernel_compatible:
            raise MoBiQuantError(f"head_slices: lm_head sliced {bits}, group {q.group_size}, does not fit the "
                                 "kernels (2-bit slices, E <= 4, K % 16, group % 32)")
        self.head_k = torch.full((1,), int(head_slices), dtype=torch.int32, device=self.device)
        self.head_bias = q.bias
        if self.use_kernels:
            self.head_packed = q.packed(self.device)
        else:
            self.head_weight = q._dense_weight(int(head_slices), self.dtype, self.device)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """logits (1, V) of one token's final hidden state x (1, hidden): lm_head, or its first ``head_slices``
        slices."""
        if self.head_slices is None:
            return F.linear(x, self.model.lm_head.weight, self.model.lm_head.bias)
        if not self.use_kernels:
            return F.linear(x, self.head_weight, self.head_bias)
        P = self.head_packed
        return torch.ops.mobiquant.sliced_linear(x, P.qweight, P.scale, P.zero, self.head_k, self.head_bias,
                                                 P.group_size)

    def _build_int8_buffers(self) -> None:
        """int8 activations: per input width K, the (xq (1, K/4) int32, xs (1, K/128, 2) fp32) buffers that a routed
        group's router launch fills and its linears' launch reads (kernels/act_int8.py)."""
        self.x8 = {}
        if not self.int8_activations:
            return
        for j, P in self.packed.items():
            K = P.in_features
            if P.group_size != 128 or K % 256:
                raise MoBiQuantError(f"int8_activations needs groups of 128 and input widths that are multiples of "
                                     f"256; {self.names[j]} has group {P.group_size}, {K} inputs")
            if K not in self.x8:
                self.x8[K] = (torch.zeros(1, K // 4, dtype=torch.int32, device=self.device),
                              torch.zeros(1, K // 128, 2, dtype=torch.float32, device=self.device))

    def _build_routing(self) -> None:
        dev = self.device
        self.groups = []  # per block: {"qkv": _Group, "o": ..., "gu": ..., "down": ...}
        for entry in self.blocks:
            g = {}
            for key, leaves in (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
                                ("gu", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
                q = [(entry[n][1], entry[n][0]) for n in leaves if entry[n][1] is not None]
                g[key] = _Group([j for j, _ in q], [m for _, m in q], dev) if q else None
            if g["o"] is not None and self._head_chunks:  # one head a program, with or without attention_router,
                g["o"].chunk = self.head_dim  # so that engines that differ only in it sum alike
            self.groups.append(g)
        self.multi = []  # per block: {"qkv": (qweights, scales, zeros, bias, splits, group size), "gu": ...}
        for entry in self.blocks:
            mb = {}
            for key, leaves in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gu", ("gate_proj", "up_proj"))):
                js = [entry[n][1] for n in leaves]
                if not self.use_kernels or any(j is None for j in js):
                    continue
                P = [self.packed[j] for j in js]
                if len({(p.group_size, p.num_slices) for p in P}) > 1:
                    continue
                mods = [entry[n][0] for n in leaves]
                bias = None
                if any(m.bias is not None for m in mods):
                    bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=self.dtype,
                                                                                      device=dev) for m in mods])
                mb[key] = ([p.qweight for p in P], [p.scale for p in P], [p.zero for p in P], bias,
                           [p.out_features for p in P], P[0].group_size)
            self.multi.append(mb)
        n = self.n_linears
        self.given = torch.ones(max(n, 1), dtype=torch.bool, device=dev)  # count taken from counts_in
        self.counts_in = torch.ones(max(n, 1), dtype=torch.int32, device=dev)
        if not n:
            self.precisions = []
            return
        m0 = self.quant[0]
        self.slice_bits, self.precisions = m0.slice_bits, m0.precisions
        E = m0.num_slices
        self.routed = [m.router is not None for m in self.quant]
        B0, BE = self.precisions[0], self.precisions[-1]
        P = int(round((BE - B0) * GRID)) + 1
        self.grid = [B0 + p / GRID for p in range(P)]
        tau = torch.zeros(P, n, dtype=torch.float32)
        force_on = torch.zeros(P, max(E - 1, 1), dtype=torch.bool)
        force_off = torch.zeros_like(force_on)
        allocation = None
        for j, m in enumerate(self.quant):
            if not self.routed[j]:
                continue
            table = m.thresholds if m.thresholds is not None else ThresholdTable({m.name: m}, "layer")
            if allocation not in (None, table.allocation):
                raise MoBiQuantError("the model's routers mix the nested and band allocations")
            allocation = table.allocation
            name = m.name if m.name in table.linears else next(iter(table.linears))
            for p, b in enumerate(self.grid):  # "layer" τ; an "adaptive" table's _build gives the same
                tau[p, j] = table.tau(name, b) if table.mode != "adaptive" else _layer_tau(table, name, b)
        if allocation in ("band", "fisher"):  # fisher: the uniform band here (per-linear bands: not yet on the device)
            for p, b in enumerate(self.grid):
                k_hi = next((k for k, bk in enumerate(self.precisions, start=1) if bk >= b - 1e-9), E)
                for c in range(E - 1):  # residual column c holds slice c + 2 (route.band_scores)
                    force_on[p, c] = c < k_hi - 2
                    force_off[p, c] = c > k_hi - 2
        self.allocation = allocation or "nested"
        self.tau_table = tau.to(dev)
        self.force_on_table, self.force_off_table = force_on.to(dev), force_off.to(dev)
        # (τ (n,), force_on (E-1,), force_off (E-1,)) of the budget in force, which the step reads: set_budget copies
        # the budget's row of the tables here (no lookup in the step)
        self.th = (self.tau_table[0].clone(), self.force_on_table[0].clone(), self.force_off_table[0].clone())
        self.set_k(E)

    def _build_norm_fold(self) -> None:
        """norm_fold: where no count is routed (``_all_given``), the step's norms before q/k/v (past the first
        block) and gate/up are computed by the linear before them (down_proj, o_proj: ``sliced_gemv_cc(...,
        fold=)``) with the int8 codes of their input, so that neither group's router is launched (router.NormFold);
        a second graph. Needs attention_router and int8 activations, every group routed and fused, and o_proj and
        down_proj without bias, on tiles of 128 rows."""
        asked = self._norm_fold_asked
        why = None
        if not (self.attention_router and self.int8_activations):
            why = "attention_router and int8_activations"
        elif not all(self._fused_route(grp[key], key in ("o", "down") or key in mb)
                     for grp, mb in zip(self.groups, self.multi) for key in ("qkv", "o", "gu", "down")):
            why = "every group routed, q/k/v and gate/up one launch each"
        else:
            from .kernels.sliced_gemv_cc import config_cc

            for entry in self.blocks:
                for leaf in ("o_proj", "down_proj"):
                    if entry[leaf][0].bias is not None:  # the fold adds y to h in the kernel: no bias after it
                        why = "o_proj and down_proj without bias"
                    P = self.packed[entry[leaf][1]]
                    cfg = config_cc(1, P.out_features, P.in_features, P.group_size, True)  # the launch's own tile
                    if cfg["BLOCK_N"] != 128 or P.out_features % 128:
                        why = "o_proj and down_proj on tiles of 128 rows"
        self.norm_fold = why is None if asked is None else bool(asked)
        if asked and why is not None:
            raise MoBiQuantError(f"norm_fold needs {why}")
        D = self.base.embed_tokens.weight.shape[1]  # the folds write the hidden width's codes only
        self.x8_fold = {D: tuple(torch.zeros_like(t) for t in self.x8[D])} if self.norm_fold else {}

    def _fold(self, group, h: torch.Tensor, ln, th):
        """The NormFold of a group whose input is ln(h + y), y the output of the launch it is passed to (every
        count given: no router partials)."""
        from .kernels.router import norm_fold

        lo, hi = group.lo, group.hi
        K = h.numel()
        return norm_fold(h.reshape(-1), ln.weight, ln.variance_epsilon, group.s, group.w1, group.b1, group.w2,
                         group.b2, th[0][lo:hi], th[1], th[2], self.given[lo:hi], self.counts_in[lo:hi],
                         self.counts_out[lo:hi], self.x8_fold[K], routed=False)

    # ------------------------------------------------------------------------------------------ precision
    def set_budget(self, budget: float) -> None:
        """Routers pick each token's slices for ``budget`` average bits (device writes only); at B_1 and B_E every
        count is forced (route.forced_count) and the routers skip their MLPs."""
        self._need_quant()
        B = self.precisions
        if not B[0] - 1e-9 <= budget <= B[-1] + 1e-9:
            raise MoBiQuantError(f"bit budget {budget:g} is outside this model's range {B[0]:g}..{B[-1]:g} bits")
        k = forced_count(tuple(self.slice_bits), budget)
        given = [not r for r in self.routed]
        if k is None and any(given) and not any(abs(budget - b) < 1e-9 for b in B):
            # routerless linears: only the uniform budgets (as MoBiQuantLinear.route)
            raise MoBiQuantError(f"a linear has no router (not calibrated): only the uniform budgets {B} bits, "
                                 "or mode='random'")
        p = min(max(round((budget - B[0]) * GRID), 0), len(self.grid) - 1)  # the budget's row of the tables
        for now, table in zip(self.th, (self.tau_table, self.force_on_table, self.force_off_table)):
            now.copy_(table[p], non_blocking=True)
        if k is not None:
            self.given.fill_(True)
            self.counts_in.fill_(k)
            self._all_given = True
            return
        self._all_given = all(given)
        if any(given):
            self.counts_in.fill_(min(range(len(B)), key=lambda i: abs(B[i] - budget)) + 1)
        self.given.copy_(torch.tensor(given), non_blocking=True)

    def set_k(self, k: int) -> None:
        """Every token and linear at the first k slices."""
        self._need_quant()
        if not 1 <= k <= len(self.precisions):
            raise MoBiQuantError(f"k={k} slices requested; this model has 1..{len(self.precisions)}")
        self.given.fill_(True)
        self.counts_in.fill_(int(k))
        self._all_given = True

    def set_counts(self, counts: torch.Tensor) -> None:
        """Counts given per linear (n_linears,) for the next decode step (the random baseline draws them)."""
        self._need_quant()
        self.given.fill_(True)
        self.counts_in.copy_(counts.reshape(-1).to(torch.int32), non_blocking=True)
        self._all_given = True

    def _need_quant(self) -> None:
        if not self.n_linears:
            raise MoBiQuantError("this model has no quantized linears: nothing to route")

    # ------------------------------------------------------------------------------------------ forward
    def _route(self, group: _Group | None, x: torch.Tensor, th, given_counts) -> torch.Tensor | None:
        """(T, R) int32 counts of a group's linears for the T tokens x (T, K)."""
        if group is None:
            return None
        T = x.shape[0]
        lo, hi = group.lo, group.hi
        cin = self.counts_in[lo:hi] if given_counts is None else given_counts[:, lo:hi]
        given = self.given[lo:hi] if given_counts is None else torch.ones_like(self.given[lo:hi])
        if not group.routed:
            return cin.expand(T, hi - lo).to(torch.int32)
        tau, on, off = th[0][lo:hi], th[1], th[2]  # the budget's row of the device tables
        if T == 1 and given_counts is None and self.use_kernels:
            return torch.ops.mobiquant.route_counts(x[0], group.s, group.w1, group.b1, group.w2, group.b2, tau, on,
                                                    off, given, cin, group.chunk or 0)[None]
        scores = ops.router_scores(x, group.s, group.w1, group.b1, group.w2, group.b2)
        return ops.counts_from_scores(scores, tau, on, off, given, cin)

    def _linear(self, mod, j: int | None, x: torch.Tensor, counts: torch.Tensor | None, group) -> torch.Tensor:
        if j is None:
            return F.linear(x, mod.weight, mod.bias)
        c = counts[:, j - group.lo]  # (T,) int32: this linear's column of its group's counts
        if self.use_kernels:
            P = self.packed[j]
            return torch.ops.mobiquant.sliced_linear(x, P.qweight, P.scale, P.zero, c, mod.bias, P.group_size)
        W = self.dense[j]
        y = F.linear(x, W[0], mod.bias)
        for k in range(2, len(W) + 1):  # each token's own Ŵ_k, chosen on the device
            y = torch.where((c == k)[:, None], F.linear(x, W[k - 1], mod.bias), y)
        return y

    def _fused_route(self, group: _Group | None, one_launch: bool) -> bool:
        """Whether a group's counts are finished inside its linears' launch (fuse_router, routed, one launch)."""
        return self.fuse_router and self.fuse_linears and one_launch and group is not None and group.routed

    def _route_linear(self, group: _Group, entry, x: torch.Tensor | None, th, norm=None, silu=None, rope=None,
                      attn=None, fold=None, folded=None):
        """A routed group at one token, the router finished inside the linear: the router launch stores its fc1
        partials only (router.route_partials), and the v7 launch after it sums them, applies fc2 and the thresholds
        in each program (the router kernel's own code, so the counts are route_counts') and stores the counts.
        entry: a ``multi`` entry (q/k/v, gate/up) or a (module, index) pair (o, down). x None: the router launch
        computes it, ``norm=(h, r, norm module)`` (add + RMSNorm) or ``silu=(g, u)`` (``router_glue``).
        ``rope=(cos, sin, pos, k_cache, v_cache)`` (q/k/v without bias): the launch ends with rope_kv's work and its
        one output is q rotated (H, Dh).
        ``attn=(q, layer, pos)`` (o_proj, x None): the attention computes x and the router's partials in its epilogue
        (router.route_attention, ``attention_router``), so the router is not launched.
        ``fold``: a NormFold that this (one-weight) launch computes instead of storing its output (``norm_fold``);
        ``folded``: the NormFold this group's input comes from (no router launch).
        Returns (counts (1, R) int32, the R outputs (1, N_r) (None with fold), h + r (norm=) or None)."""
        from .kernels.layout import PackedSlices
        from .kernels.router import route_attention, route_partials
        from .kernels.sliced_gemv_cc import sliced_gemv_cc

        lo, hi = group.lo, group.hi
        if len(entry) == 2:  # one linear
            mod, j = entry
            packs, bias, splits = [self.packed[j]], mod.bias, [mod.out_features]
        else:
            qw, sc, zr, bias, splits, group_size = entry
            packs = [PackedSlices(q, s, z, group_size) for q, s, z in zip(qw, sc, zr)]
        x8 = self.x8.get(packs[0].in_features)  # int8 activations: written by the router launch, read by v10
        if norm is not None:
            h, r, ln = norm
            norm = (h, r, ln.weight, ln.variance_epsilon)
        rargs = (group.s, group.w1, group.b1, group.w2, group.b2, th[0][lo:hi], th[1], th[2], self.given[lo:hi],
                 self.counts_in[lo:hi])
        if folded is not None:
            plan, x8 = folded.plan, (folded.xq, folded.xs)
        elif attn is not None:
            q, layer, pos = attn
            plan = route_attention(q, self.k_cache[layer], self.v_cache[layer], pos, self.window or 0, self.scaling,
                                   *rargs, out=self.counts_out[lo:hi], x_int8=x8)
        else:
            plan = route_partials(None if x is None else x.reshape(-1), *rargs, out=self.counts_out[lo:hi],
                                  chunk_k=group.chunk, x_int8=x8, norm=norm, silu=silu)
        y = sliced_gemv_cc(plan.x.reshape(1, -1), packs if len(packs) > 1 else packs[0], None, route=plan,
                           x_int8=x8, rope=rope, fold=fold)
        if fold is not None:
            return plan.out[None], (None,), plan.h
        if rope is not None:
            return plan.out[None], (y,), plan.h
        if bias is not None:
            y = y + bias.to(y.dtype)
        return plan.out[None], y.split(splits, dim=-1), plan.h

    def _linear_multi(self, entry, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A group's linears (all quantized) in one launch: counts (1, R) -> R outputs (views of one (1, ΣN))."""
        qw, sc, zr, bias, splits, group_size = entry
        y = torch.ops.mobiquant.sliced_linear_multi(x, qw, sc, zr, counts, bias, group_size)
        return y.split(splits, dim=-1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, decode: bool, given_counts=None):
        """ids (T,), positions (T,) -> (logits (V,) fp32 of the last token, counts (T, n_linears) int32)."""
        T = ids.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = self.base.embed_tokens(ids)  # (T, hidden)
        cos = self.cos.index_select(0, positions)[None]  # (1, T, D), broadcast over heads
        sin = self.sin.index_select(0, positions)[None]
        th = self.th if self.n_linears and any(self.routed) else None
        if decode:
            valid = self._kv_pos <= positions  # (S,) keys written so far
            if self.window:
                valid &= self._kv_pos > positions - self.window
        all_counts = []
        for l, (layer, blk, grp) in enumerate(zip(self.layers, self.blocks, self.groups)):

            def lin(leaf, x, counts, group, blk=blk):
                return self._linear(*blk[leaf], x, counts, group)

            x = layer.input_layernorm(h)
            c = self._route(grp["qkv"], x, th, given_counts)
            q = lin("q_proj", x, c, grp["qkv"]).view(T, H, D).transpose(0, 1)  # (H, T, D)
            k = lin("k_proj", x, c, grp["qkv"]).view(T, KV, D).transpose(0, 1)  # (KV, T, D)
            v = lin("v_proj", x, c, grp["qkv"]).view(T, KV, D).transpose(0, 1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[l].index_copy_(1, positions, k)
            self.v_cache[l].index_copy_(1, positions, v)
            if decode:  # one query against the whole static cache, masked (GQA: G query heads per kv head)
                qg = q.reshape(KV, H // KV, D)  # (KV, G, D)
                s = torch.matmul(qg, self.k_cache[l].transpose(1, 2)).float() * self.scaling  # (KV, G, S)
                s = s.masked_fill(~valid, float("-inf"))
                o = torch.matmul(torch.softmax(s, dim=-1).to(self.dtype), self.v_cache[l])  # (KV, G, D)
                o = o.reshape(1, H * D)
            else:  # prefill from position 0: causal attention over the prompt itself
                G = H // KV
                kk, vv = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
                mask = None
                if self.window and T > self.window:
                    i = torch.arange(T, device=ids.device)
                    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
                o = F.scaled_dot_product_attention(q[None], kk[None], vv[None], attn_mask=mask,
                                                   is_causal=mask is None, scale=self.scaling)[0]
                o = o.transpose(0, 1).reshape(T, H * D)  # (T, H*D)
            co = self._route(grp["o"], o, th, given_counts)
            h = h + lin("o_proj", o, co, grp["o"])
            x = layer.post_attention_layernorm(h)
            cg = self._route(grp["gu"], x, th, given_counts)
            a = layer.mlp.act_fn(lin("gate_proj", x, cg, grp["gu"])) * lin("up_proj", x, cg, grp["gu"])
            cd = self._route(grp["down"], a, th, given_counts)
            h = h + lin("down_proj", a, cd, grp["down"])
            all_counts += [t for t in (c, co, cg, cd) if t is not None]
        h = self.base.norm(h[-1:])
        logits = self._head(h)[0].float()
        if not all_counts:
            return logits, torch.ones(T, 1, dtype=torch.int32, device=ids.device)
        return logits, torch.cat(all_counts, dim=1)

    def _decode_fused(self, ids: torch.Tensor, positions: torch.Tensor, fold: bool = False):
        """The decode step of ``_forward`` (one token) with the glue between the linears fused (mobiquant/ops.py:
        add_rms_norm, rope_kv, decode_attention, silu_mul): 5 launches per block instead of ~40, fewer where the
        router launches compute the norms and SiLU·up (``router_glue``)."""
        mq = torch.ops.mobiquant
        h = self.base.embed_tokens(ids)  # (1, hidden)
        th = self.th if self.n_linears and any(self.routed) else None
        pending = None  # the block output not yet added to h: added by the next norm
        folded = None  # norm_fold: the NormFold of this block's q/k/v input, computed by the down_proj before it
        all_counts = []
        L = len(self.layers)
        for l, (layer, blk, grp, mul) in enumerate(zip(self.layers, self.blocks, self.groups, self.multi)):
            cache = (self.cos, self.sin, positions, self.k_cache[l], self.v_cache[l])
            rope = cache if self._rope_in_qkv(grp["qkv"], mul.get("qkv")) else None
            if folded is not None:
                c, qkv, _ = self._route_linear(grp["qkv"], mul["qkv"], None, th, rope=rope, folded=folded)
            else:
                c, qkv, h = self._norm_group(grp["qkv"], mul.get("qkv"), blk, ("q_proj", "k_proj", "v_proj"), h,
                                             pending, layer.input_layernorm, th, rope)
            q = qkv[0] if rope is not None else mq.rope_kv(*qkv, *cache)  # (H, D)
            if fold:  # o_proj adds its output to h and computes gate/up's input: no router launch
                fgu = self._fold(grp["gu"], h, layer.post_attention_layernorm, th)
                co, _, _ = self._route_linear(grp["o"], blk["o_proj"], None, th, attn=(q, l, positions), fold=fgu)
                cg, (g, u), _ = self._route_linear(grp["gu"], mul["gu"], None, th, folded=fgu)
                folded = self._fold(self.groups[l + 1]["qkv"], h, self.layers[l + 1].input_layernorm, th) \
                    if l + 1 < L else None
                if folded is not None:
                    cd, _, _ = self._route_linear(grp["down"], blk["down_proj"], None, th, silu=(g, u), fold=folded)
                else:
                    cd, pending = self._silu_down(grp["down"], blk, g, u, th)
                all_counts += [c, co, cg, cd]
                continue
            if self.attention_router and self._fused_route(grp["o"], True):  # no launch of o_proj's router
                co, (y,), _ = self._route_linear(grp["o"], blk["o_proj"], None, th, attn=(q, l, positions))
            else:
                o = mq.decode_attention(q, self.k_cache[l], self.v_cache[l], positions, self.window or 0,
                                        self.scaling)[None]  # (1, H*D)
                if self._fused_route(grp["o"], True):
                    co, (y,), _ = self._route_linear(grp["o"], blk["o_proj"], o, th)
                else:
                    co = self._route(grp["o"], o, th, None)
                    y = self._linear(*blk["o_proj"], o, co, grp["o"])
            cg, (g, u), h = self._norm_group(grp["gu"], mul.get("gu"), blk, ("gate_proj", "up_proj"), h, y,
                                             layer.post_attention_layernorm, th)
            cd, pending = self._silu_down(grp["down"], blk, g, u, th)
            all_counts += [t for t in (c, co, cg, cd) if t is not None]
        _, x = mq.add_rms_norm(h, pending, self.base.norm.weight, self.base.norm.variance_epsilon)
        logits = self._head(x)[0]  # fp32 in _decode_body's copy
        if not all_counts:
            return logits, torch.ones(1, 1, dtype=torch.int32, device=ids.device)
        return logits, self._counts_row(all_counts)

    def _counts_row(self, all_counts: list[torch.Tensor]) -> torch.Tensor:
        """(1, n_linears) counts of the step: counts_out itself where every group's launch stored its counts there
        (the fused routers), else their concatenation."""
        off, base = 0, self.counts_out.data_ptr()
        for t in all_counts:
            if t.data_ptr() != base + 4 * off:
                return torch.cat(all_counts, dim=1)
            off += t.shape[1]
        return self.counts_out[None] if off == self.n_linears else torch.cat(all_counts, dim=1)

    def _rope_in_qkv(self, group, multi) -> bool:
        """Whether a block's q/k/v launch does the rotary and the cache write (fuse_rope; no bias)."""
        return self.fuse_rope and self._fused_route(group, multi is not None) and multi[3] is None

    def _norm_group(self, group, multi, blk, leaves, h, r, ln, th, rope=None):
        """x = ln(h + r) and a group's linears on it (q/k/v or gate/up) at one token: the norm inside the router
        launch (router_glue), or add_rms_norm, then the fused router and one launch, or the router and the linears.
        rope: passed to the fused launch with router_glue (``_route_linear``; ``_rope_in_qkv`` says where it
        applies).
        Returns (counts (1, R) or None, the outputs, h + r)."""
        mq = torch.ops.mobiquant
        if self._fused_route(group, multi is not None):
            if self.router_glue:
                return self._route_linear(group, multi, None, th, norm=(h, r, ln), rope=rope)
            h, x = mq.add_rms_norm(h, r, ln.weight, ln.variance_epsilon)  # (fuse_rope needs router_glue: no rope)
            return (*self._route_linear(group, multi, x, th)[:2], h)
        h, x = mq.add_rms_norm(h, r, ln.weight, ln.variance_epsilon)
        c = self._route(group, x, th, None)
        if self.fuse_linears and multi is not None:
            return c, self._linear_multi(multi, x, c), h
        return c, tuple(self._linear(*blk[n], x, c, group) for n in leaves), h

    def _silu_down(self, group, blk, g, u, th):
        """down_proj(silu(g) * u) at one token: SiLU·up inside the router launch (router_glue), or silu_mul, then
        the fused router, or the router and the linear. Returns (counts (1, 1) or None, the output)."""
        if self.router_glue and self._fused_route(group, True):
            c, (y,), _ = self._route_linear(group, blk["down_proj"], None, th, silu=(g, u))
            return c, y
        a = torch.ops.mobiquant.silu_mul(g, u)
        if self._fused_route(group, True):
            c, (y,), _ = self._route_linear(group, blk["down_proj"], a, th)
            return c, y
        c = self._route(group, a, th, None)
        return c, self._linear(*blk["down_proj"], a, c, group)

    def _use_fold(self) -> bool:
        """Whether the mode in force runs the step with the norms folded (``norm_fold``: no count routed)."""
        return self.norm_fold and self._all_given

    def _decode_body(self, fold: bool | None = None) -> None:
        """One decode step; fold: the step with the norms folded (default: as the mode in force runs it)."""
        fold = self._use_fold() if fold is None else fold
        if self.fuse_glue:
            logits, counts = self._decode_fused(self.tok, self.pos, fold)
        else:
            logits, counts = self._forward(self.tok, self.pos, decode=True)
        if counts.data_ptr() != self.counts_out.data_ptr():
            self.counts_out.copy_(counts[0])
        if self.fuse_glue:  # one launch: the logits in fp32, the greedy token, the next position
            torch.ops.mobiquant.greedy_step(logits, self.logits, self.tok, self.pos, *self._greedy_ws)
            return
        self.logits.copy_(logits)
        self.tok.copy_(greedy(self.logits).reshape(1))  # greedy feedback: the next step's input unless overwritten
        self.pos.add_(1)

    # ------------------------------------------------------------------------------------------ public steps
    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Capture the decode step in a CUDA graph (after warm-up runs that compile the kernels); with
        ``norm_fold`` the all-given modes' step (the norms folded) in a second one. ``decode`` replays the graph of
        the mode in force: a budget switch never captures."""
        graphs = []
        for fold in (False, True) if self.norm_fold else (False,):
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(warmup):
                    self.pos.zero_()
                    self._step(fold)
            torch.cuda.current_stream(self.device).wait_stream(s)
            graphs.append(torch.cuda.CUDAGraph())
            self.pos.zero_()
            with torch.cuda.graph(graphs[-1]):
                self._step(fold)
            self.captures += 1
        self.graph = graphs[0]
        self.graph_fold = graphs[1] if len(graphs) > 1 else None
        self.pos.zero_()
        if self.use_kernels:  # the split-K workspaces in the graph stay alive with it, even if later calls grow them
            from .kernels.router import _FOLD_SCRATCH, _SCRATCH
            from .kernels.sliced_gemv import _WORKSPACE

            self._workspaces = (dict(_WORKSPACE), dict(_SCRATCH), dict(_FOLD_SCRATCH))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, counts: torch.Tensor | None = None):
        """Run the prompt ids (T,) from position 0 (eager). counts: optional (T, n_linears) given counts.
        Returns (logits (V,) fp32 of the last token, counts (T, n_linears) int32), both on the device."""
        ids = ids.reshape(-1).to(self.device)
        T = ids.shape[0]
        if not 1 <= T < self.max_seq_len:
            raise MoBiQuantError(f"a prompt of {T} tokens does not fit the engine's {self.max_seq_len} positions")
        given = None if counts is None else counts.to(device=self.device, dtype=torch.int32).reshape(T, -1)
        logits, out = self._forward(ids, torch.arange(T, device=self.device), decode=False, given_counts=given)
        self.pos.fill_(T)
        self.tok.copy_(logits.argmax().reshape(1))
        self.logits.copy_(logits)
        return self.logits, out

    @torch.no_grad()
    def decode(self, token: int | None = None):
        """One decode step (graph replay). token: the input token; None = the greedy token of the previous step.
        Returns (logits (V,) fp32, counts (n_linears,) int32): static buffers, overwritten by the next step."""
        if token is not None:
            self.tok.fill_(int(token))
        if self.graph is not None:
            (self.graph_fold if self._use_fold() else self.graph).replay()
        else:
            self._step()
        return self.logits, self.counts_out

    # ------------------------------------------------------------------------------------------ reporting
    def summarize(self, counts: torch.Tensor):
        """counts (T, n) on the CPU -> (slices (layers, linears) of the last token, column names, realized bits):
        what ``RoutingTrace.matrix()`` and ``realized_bits()`` give for the same counts."""
        if not hasattr(self, "_cols"):
            split = [split_name(n) for n in self.names]
            self._col_names = sorted({leaf for _, leaf in split}, key=_LINEAR_ORDER)
            self._rows = torch.tensor([i for i, _ in split])
            self._cols = torch.tensor([self._col_names.index(leaf) for _, leaf in split])
            self._w = torch.tensor([m.in_features * m.out_features for m in self.quant], dtype=torch.float64)
            self._B = torch.tensor([0.0, *self.precisions], dtype=torch.float64)
        counts = counts.reshape(-1, self.n_linears).long()
        out = torch.zeros(1 + int(self._rows.max()), len(self._col_names), dtype=torch.long)
        keep = self._rows >= 0
        out[self._rows[keep], self._cols[keep]] = counts[-1, keep]
        bits = float((self._B[counts] * self._w).sum() / (self._w.sum() * counts.shape[0]))
        return out, list(self._col_names), bits


def greedy(logits: torch.Tensor, block: int = 256) -> torch.Tensor:
    """logits.argmax() (the first maximum) of a (V,) vector in two reductions, a max per block of ``block`` logits
    then the argmax of the V / block maxima: torch's one-dimensional argmax reduces the whole vocabulary in one
    block of threads (27 µs for LLaMA-3's 128256 logits on an H100, 1 % of a decode step)."""
    pad = -logits.numel() % block
    v = F.pad(logits, (0, pad), value=float("-inf")) if pad else logits
    vals, idx = v.view(-1, block).max(dim=1)  # each block's first maximum
    j = vals.argmax().reshape(1)  # the first block holding the global maximum
    return (j * block + idx.index_select(0, j)).reshape(())  # index_select: no host sync (a graph can hold it)


def _glue_fits(model) -> bool:
    """Whether the fused decode glue computes this model's blocks: HF's RMSNorm (weight, variance_epsilon, the LLaMA
    formula) for every norm and a SiLU MLP (LLaMA, Mistral and Qwen2 as HF writes them)."""
    base = model.model
    norms = [base.norm] + [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    rms = all(type(n).__name__ in _RMS_NORMS and hasattr(n, "variance_epsilon") for n in norms)
    return rms and all(type(layer.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") for layer in base.layers)


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _layer_tau(table: ThresholdTable, name: str, bits: float) -> float:
    """τ of the "layer" mode for a table attached in "adaptive" mode (the fitted grid, else calibration scores)."""
    return table.tau(name, bits)  # ThresholdTable._build treats "adaptive" exactly as "layer"


# ---------------------------------------------------------------------------------------------- generation
_ENGINES_LOCK = threading.Lock()


def _fingerprint(model) -> tuple:
    qs = [m for m in model.modules() if isinstance(m, MoBiQuantLinear)]
    emb = model.model.embed_tokens.weight
    return (emb.device, emb.dtype, emb.data_ptr(), tuple((id(m), m.plane_1.data_ptr(), id(m.router)) for m in qs))


def engine_for(model, needed_len: int, int8_activations: bool = False,
               head_slices: int | None = None) -> DecodeEngine | None:
    """The model's cached engine with at least ``needed_len`` positions and the given ``int8_activations`` and
    ``head_slices`` (built or rebuilt when needed), or None if the engine cannot serve this model (``supported``) or
    is busy with another generation. A model these options do not fit raises MoBiQuantError."""
    if supported(model) is not None:
        return None
    with _ENGINES_LOCK:
        eng = model.__dict__.get("_mobiquant_engine")
        fp = _fingerprint(model)
        if eng is not None and (eng.max_seq_len < needed_len or eng._fingerprint != fp
                                or eng.int8_activations != bool(int8_activations)
                                or eng.head_slices != head_slices):
            if eng.lock.locked():
                return None
            eng = None
        if eng is None:
            limit = getattr(model.config, "max_position_embeddings", 4096)
            size = min(max(1024, 1024 * math.ceil(needed_len / 1024)), max(limit, needed_len))
            eng = DecodeEngine(model, size, int8_activations=int8_activations, head_slices=head_slices)
            eng._fingerprint = fp
            model.__dict__["_mobiquant_engine"] = eng
        return eng


def engine_steps(eng: DecodeEngine, tokenizer, ids: torch.Tensor, control, precisions, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int, eos: set):
    """elastic_generate's loop on the engine: the same TokenStep per token (see generate.py). Holds eng.lock."""
    from .generate import TokenStep, _step_precision, next_token
    from .route import random_counts

    if not eng.lock.acquire(blocking=False):
        return None

    def run():
        try:
            gen = torch.Generator().manual_seed(seed)
            generated, text_so_far = [], ""
            T = ids.shape[-1]
            for i in range(max_new_tokens):
                if control.stop:
                    return
                t0 = time.perf_counter()
                budget, kw = _step_precision(precisions, control, seed + i)
                n_tok = T if i == 0 else 1
                given = None
                if "k" in kw:
                    eng.set_k(kw["k"])
                elif kw["mode"] == "random":  # drawn exactly as MoBiQuantLinear.route draws them, linear by linear
                    g = torch.Generator().manual_seed(kw["seed"])
                    given = torch.stack([random_counts((1, n_tok), eng.slice_bits, budget, g).reshape(-1)
                                         for _ in range(eng.n_linears)], dim=1)  # (n_tok, n)
                    if i:
                        eng.set_counts(given[0])
                else:
                    eng.set_budget(budget)
                if i == 0:
                    logits, counts = eng.prefill(ids, given)
                else:
                    logits, counts = eng.decode(generated[-1])
                logits, counts = logits.cpu(), counts.cpu()  # the step's one synchronisation
                tok, piece, text_so_far, prob, top = next_token(logits, tokenizer, generated, text_so_far,
                                                                temperature, top_p, gen)
                slices, names, bits = eng.summarize(counts)
                yield TokenStep(i, tok, piece, budget, control.mode, bits, slices, names,
                                time.perf_counter() - t0, prob, top)
                if tok in eos:
                    return
        finally:
            eng.lock.release()

    return run()


__all__ = ["DecodeEngine", "supported", "engine_for", "engine_steps", "GRID"]
