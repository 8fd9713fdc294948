"""Where the decode step's time goes beyond the linears (H100): the engine's step at budgets 2 and 4, at uniform
k = 1 and 2 with the router launches in the graph (counts given: fc1 skipped), and with no router launch at all
(every group unrouted, counts from counts_in), for the fp16- and the int8-activation engine; plus a torch.profiler
sum per kernel category at budget 2 and with no router at k = 1.

Why: the end-to-end targets (450 tok/s at 4 bits, 600 at 2) leave 2.22 / 1.67 ms per step; the linears take
~1.6 / ~1.1 ms of it in the isolated stack. This says how much of the rest is router launches, router work, glue and
lm_head, and so what fusing them could save.

Part ``glue_ab`` (twelfth session): the engine's ``router_glue`` (the norms before q/k/v and gate/up and SiLU·up
computed inside the router launches, 96 launches fewer per step) off and on, alternating 3 rounds with one capture
each, at budgets 2 and 4 and k = 2, fp16 and int8 activations; the logits and counts of 4 greedy steps compared
(must be equal).

Part ``fold`` (twenty-first session): the same alternation for the engine flag ``norm_fold`` (where no count is routed,
a second graph in which o_proj and down_proj compute the norm before gate/up and the next q/k/v and their int8 codes
in their tiles' last splits: 63 router launches fewer per step), int8 engine, budgets 2 and 4 (routed: the same
graph either way, a control) and k = 2; the logits differ where the folded graph runs (other roundings), so "equal"
is False there. Part ``fdiag`` (needs ``norm_fold_diag.patch``, the flag as an integer): ``norm_fold`` 0, 1 (the
folds at every budget, router partials included) and 2 (the folds computed into a scratch residual and not used, the
router launches kept: what the folding tails cost alone), alternating rounds, budgets 2 and 4.

Part ``attention_router`` (seventeenth session): the same alternation for ``attention_router`` (o_proj's router partials
and int8 codes computed in the attention's epilogue, 32 launches fewer per step).

Part ``steps``: only the step at budgets 2 and 4 (``STEP_BUDGETS``), fp16 and int8 activations (``STEP_ENGINES``)
(median of 5 × 3 × 100 replays), to compare two trees run one after the other on one machine.

Part ``argmax``: the step's greedy feedback by torch's one-dimensional argmax against the engine's two-stage
``greedy``, alternating rounds (int8 engine, budget 2).

Part ``attn``: the attention kernel's warps and slot block (``ATTN_VARIANTS``), alternating rounds (int8 engine,
budget 4, ``ATTN_BUDGETS``; the step's graph recaptured per variant).

Part ``modab`` (twentieth session): module constants of mobiquant.kernels (``MODAB``: variants of
"module.NAME=int,...", space-separated), alternating rounds (int8 engine, ``MODAB_BUDGETS``, ``MODAB_ROUNDS``).

Part ``early`` (fourteenth session): the rotary's cos / sin and the attention's first block of keys and values
loaded before griddepcontrol.wait (``decode_step.EARLY_LOADS``) off and on, alternating rounds (int8 engine, budgets
2 and 4).

Part ``b4parts`` (fifteenth session): what budget 4 costs over uniform k = 2 (the same 4 bits on average), int8
engine: the routed step, the same step with the counts of one routed step given (the router launches run, their MLPs
do not: the same mixed k in the linears without the routing work), and uniform k = 2 given, alternating rounds;
then, in a second engine, the router launches computing their fc1 partials while the linears take those counts as
given (``RoutePlan.args`` patched here: the router side of the routing work alone).

Part ``rchunk`` (eighteenth session): in-features per router program (``router.CHUNK_K``, ``RCHUNKS``), alternating
rounds (int8 engine, budgets 4 and 3).

Part ``rwarps``: the router launch's warps (``RWARPS``, default 4 / 2 / 8; add_rms_norm follows), alternating rounds
(int8, budget 4).

Part ``skipglue`` (nineteenth session): at budget 2 (``SKIP_BUDGETS``), the int8 step with its router launches, without
the down router launch, without any router launch, and without the attention kernel (stale inputs: timing only),
alternating rounds: the most that folding the router launches' glue (norms, SiLU·up, int8 codes) into the linears,
or a faster attention, could save where no count is routed.

Part ``given_graph`` (nineteenth session; needs ``given_graph.patch``, not kept): the same alternation for the engine
flag ``given_graph`` (int8 engine; budgets 2 and 8 and k = 2, where the given graph replays, and budget 4, where the
routed graph does: a control).

Part ``nopdl`` (twelfth session): every launch of the step without programmatic dependent launch (glue, router and
linears), so that kernels do not overlap and torch.profiler's per-kernel times are their own: the step's time by
kernel category, int8 engine at budgets 2 and 4 (the step is slower than with PDL; the shares are what it says).

    OUT=/tmp PYTHONPATH=<package> python3 -P benchmarks/experiments/step_overhead.py   # $OUT/step_overhead_h100.json
    PARTS=glue_ab ...                                                   # overhead,glue_ab,argmax,nopdl,steps
    LAYERS=4 ...                                                                          # smoke test
"""

import datetime
import importlib.util
import json
import os
import statistics
from pathlib import Path

import torch
import triton

from mobiquant import MoBiQuantConfig, quantize_
from mobiquant.engine import DecodeEngine

spec = importlib.util.spec_from_file_location("decode_bench", Path(__file__).parents[1] / "decode.py")
DB = importlib.util.module_from_spec(spec)
spec.loader.exec_module(DB)
OUT = Path(os.environ.get("OUT", "/tmp"))
LAYERS = int(os.environ.get("LAYERS", "32"))
PARTS = os.environ.get("PARTS", "overhead,glue_ab,argmax,nopdl")  # also: steps, attn, rwarps, early, b4parts,
# attention_router, rchunk, skipglue, given_graph, modab, fold, fdiag


def step_ms(eng, prompt, rounds=3):
    return statistics.median(DB.graph_step_ms(eng, prompt) for _ in range(rounds))


def flag_ab(model, prompt, res, save, flag="router_glue", key="glue_ab", int8s=(False, True), cases=None,
            engine_kw=None):
    """An engine flag (router_glue, attention_router, given_graph, norm_fold) off / on, alternating rounds (module
    docstring). engine_kw: the engine's options (a flag whose buffers are built at construction is built on)."""
    ab = res[key] = dict(flag=flag, rounds=[], median_step_ms={}, equal={}, max_logit_diff={})
    for int8 in int8s:
        tag = "int8" if int8 else "fp16"
        eng = DecodeEngine(model, 1024, int8_activations=int8, capture=False, **(engine_kw or {}))
        cases = cases or (("budget_2", "set_budget", 2.0), ("budget_4", "set_budget", 4.0), ("k2", "set_k", 2))
        outs = {}
        for rnd in range(3):
            for on in (False, True):
                setattr(eng, flag, on)
                eng.capture()
                for name, setter, arg in cases:
                    getattr(eng, setter)(arg)
                    ms = DB.graph_step_ms(eng, prompt)
                    ab["rounds"].append(dict(engine=tag, case=name, on=on, round=rnd, step_ms=ms))
                    DB.log(f"round {rnd} {tag} {name} {flag}={int(on)}: {ms:.4f} ms/step")
                    if rnd == 0:
                        eng.prefill(prompt)
                        outs[(name, on)] = [tuple(t.clone() for t in eng.decode()) for _ in range(4)]
                    save()
        for name, _, _ in cases:
            off = [r["step_ms"] for r in ab["rounds"] if (r["engine"], r["case"], r["on"]) == (tag, name, 0)]
            on = [r["step_ms"] for r in ab["rounds"] if (r["engine"], r["case"], r["on"]) == (tag, name, 1)]
            eq = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                     for a, b in zip(outs[(name, False)], outs[(name, True)]))
            ab["median_step_ms"][f"{tag}_{name}"] = dict(off=statistics.median(off), on=statistics.median(on))
            ab["equal"][f"{tag}_{name}"] = eq
            ab["max_logit_diff"][f"{tag}_{name}"] = max(
                (a[0] - b[0]).abs().max().item() for a, b in zip(outs[(name, False)], outs[(name, True)]))
        del eng
        torch.cuda.empty_cache()
    DB.log(f"\n| engine, case | {flag} off, ms/step | on | logits and counts equal |\n|---|---|---|---|")
    for n, v in ab["median_step_ms"].items():
        DB.log(f"| {n} | {v['off']:.4f} | {v['on']:.4f} ({100 * (v['on'] / v['off'] - 1):+.1f} %) | "
               f"{ab['equal'][n]} |")
    save()


def fold_modes(model, prompt, res, save):
    """norm_fold 0 (off), 1 (on) and 2 (the producers' folds computed, unused; the router launches kept),
    alternating rounds, int8 engine, budgets 2 and 4 (needs norm_fold_diag.patch)."""
    ab = res["norm_fold_modes"] = dict(rounds=[], median_step_ms={})
    eng = DecodeEngine(model, 1024, int8_activations=True, capture=False, norm_fold=True)
    for rnd in range(3):
        for mode in (0, 1, 2):
            eng.norm_fold = mode
            eng.capture()
            for b in (2.0, 4.0):
                eng.set_budget(b)
                ms = DB.graph_step_ms(eng, prompt)
                ab["rounds"].append(dict(mode=mode, budget=b, round=rnd, step_ms=ms))
                DB.log(f"round {rnd} norm_fold={mode} budget {b:g}: {ms:.4f} ms/step")
                save()
    for mode in (0, 1, 2):
        for b in (2.0, 4.0):
            ab["median_step_ms"][f"mode{mode}_budget_{b:g}"] = statistics.median(
                r["step_ms"] for r in ab["rounds"] if (r["mode"], r["budget"]) == (mode, b))
    DB.log(f"median ms/step: {ab['median_step_ms']}")
    save()


def nopdl_profile(model, prompt, res, save):
    """Kernel times with PDL off everywhere (module docstring)."""
    import importlib

    from mobiquant.kernels import decode_step
    from mobiquant.kernels import router as router_kernel

    sliced_gemv_cc = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")  # the module, not the function

    saved = decode_step.PDL, router_kernel.PDL_WAIT, router_kernel.PDL_TRIGGER, sliced_gemv_cc._has_pdl
    decode_step.PDL = router_kernel.PDL_WAIT = router_kernel.PDL_TRIGGER = False
    sliced_gemv_cc._has_pdl = lambda: False
    try:
        eng = DecodeEngine(model, 1024, int8_activations=True)
        for b in (2.0, 4.0):
            eng.set_budget(b)
            name = f"int8_budget_{b:g}_no_pdl"
            res["step_ms"][name] = ms = step_ms(eng, prompt)
            res["profile"][name] = DB.kernel_profile(eng, prompt)
            DB.log(f"{name}: {ms:.3f} ms/step")
            save()
        del eng
        torch.cuda.empty_cache()
    finally:
        decode_step.PDL, router_kernel.PDL_WAIT, router_kernel.PDL_TRIGGER, sliced_gemv_cc._has_pdl = saved


def ab_rounds(model, prompt, res, save, key, budget, rounds, variants, restore):
    """Alternating rounds on one int8 engine at ``budget``: per variant (its row fields, apply), apply() then a fresh
    capture and the step time; restore() at the end."""
    ab = res[key] = dict(rounds=[])
    eng = DecodeEngine(model, 1024, int8_activations=True, capture=False)
    eng.set_budget(budget)
    try:
        for rnd in range(rounds):
            for fields, apply in variants:
                apply()
                eng.capture()
                ms = DB.graph_step_ms(eng, prompt)
                ab["rounds"].append(dict(round=rnd, **fields, step_ms=ms))
                DB.log(f"round {rnd} {key} {fields}: {ms:.4f} ms/step")
                save()
    finally:
        restore()
    del eng
    torch.cuda.empty_cache()


def argmax_ab(model, prompt, res, save):
    """The greedy feedback by torch's argmax against the engine's two-stage one (budget 2)."""
    import mobiquant.engine as engine_mod

    two_stage = engine_mod.greedy

    def use(fn):
        return lambda: setattr(engine_mod, "greedy", fn)

    ab_rounds(model, prompt, res, save, "argmax_ab", 2.0, 3,
              [(dict(argmax="torch_argmax"), use(lambda v: v.argmax())), (dict(argmax="two_stage"), use(two_stage))],
              use(two_stage))


def constants_ab(model, prompt, res, save, key, budget, rounds, variants):
    """``ab_rounds`` over module constants of mobiquant.kernels: variants (row fields, {"module.NAME": value}); each
    applies its values (the other constants named by any variant keep their shipped values), and the shipped values
    are restored at the end."""
    import importlib

    names = {n for _, vals in variants for n in vals}
    mods = {n: importlib.import_module("mobiquant.kernels." + n.split(".")[0]) for n in names}
    shipped = {n: getattr(mods[n], n.split(".")[1]) for n in names}

    def use(vals):
        def apply():
            for n, x in shipped.items():
                setattr(mods[n], n.split(".")[1], type(x)(vals[n]) if n in vals else x)
        return apply

    ab_rounds(model, prompt, res, save, key, budget, rounds, [(fields, use(vals)) for fields, vals in variants],
              use({}))


ATTN_VARIANTS = tuple(tuple(int(a) for a in v.split(",")) for v in os.environ.get(
    "ATTN_VARIANTS", "4,64 2,64 8,64 4,32 2,32 8,128").split())  # (num_warps, slots a block); 4,64: the old tile


def attn_ab(model, prompt, res, save):
    """The attention kernel's warps and slots a block (decode_step.ATTN_WARPS, ATTN_SLOTS; budget 4)."""
    for budget in (float(b) for b in os.environ.get("ATTN_BUDGETS", "4").split()):
        constants_ab(model, prompt, res, save, "attn_ab" if budget == 4.0 else f"attn_ab_{budget:g}", budget, 2,
                     [(dict(num_warps=w, BLOCK_S=b), {"decode_step.ATTN_WARPS": w, "decode_step.ATTN_SLOTS": b})
                      for w, b in ATTN_VARIANTS])


def early_ab(model, prompt, res, save):
    """The rotary's and the attention's loads before griddepcontrol.wait (decode_step.EARLY_LOADS) off and on, at
    budgets 2 and 4."""
    for budget in (2.0, 4.0):
        constants_ab(model, prompt, res, save, f"early_ab_{budget:g}", budget, 3,
                     [(dict(early=on), {"decode_step.EARLY_LOADS": on}) for on in (False, True)])


def module_ab(model, prompt, res, save):
    """Module constants of mobiquant.kernels in alternating rounds (int8 engine, ``MODAB_BUDGETS``): each variant of
    ``MODAB`` ("decode_step.ATTN_WARPS=8 decode_step.ATTN_WARPS=16,decode_step.ATTN_SLOTS=64", space-separated;
    integer or boolean constants) is applied, the step's graph recaptured and timed; the constants are restored at
    the end. A constant a variant leaves out keeps its shipped value."""
    variants = [dict(kv.split("=") for kv in v.split(",")) for v in os.environ["MODAB"].split()]
    for budget in (float(b) for b in os.environ.get("MODAB_BUDGETS", "2 4").split()):
        constants_ab(model, prompt, res, save, f"module_ab_{budget:g}", budget,
                     int(os.environ.get("MODAB_ROUNDS", "2")),
                     [(dict(v), {n: int(x) for n, x in v.items()}) for v in variants])


RWARPS = tuple(int(w) for w in os.environ.get("RWARPS", "4 2 8").split())


def router_warps_ab(model, prompt, res, save):
    """The router launch's warps (and add_rms_norm's, which must match: decode_step.NORM_WARPS; budget 4)."""
    constants_ab(model, prompt, res, save, "router_warps_ab", 4.0, 2,
                 [(dict(num_warps=w), {"decode_step.NORM_WARPS": w, "router.NORM_WARPS": w}) for w in RWARPS])


RCHUNKS = tuple(os.environ.get("RCHUNKS", "256 512 1024").split())  # "a" or "a,b": a up to K = 4096, b past it


def router_chunk_ab(model, prompt, res, save):
    """In-features per router program (router.default_chunk, one tile each up to MAX_TILE_K) at budgets 4 and 3: a wider
    chunk means fewer fc1 partials for each routed linear's programs to read and sum (16 at 256 for K = 4096, 56 for
    down_proj's 14336) and fewer, longer router programs. o_proj's router keeps one head a program. A variant "a,b"
    gives the routers of K <= 4096 chunks of a and down_proj's of b."""
    from mobiquant.kernels import router as router_kernel

    shipped = router_kernel.MAX_TILE_K, router_kernel.default_chunk

    def use(variant):
        a, b = (int(c) for c in (variant + "," + variant).split(",")[:2])

        def apply():
            router_kernel.MAX_TILE_K = max(a, b, 256)
            router_kernel.default_chunk = lambda K: a if K <= 4096 else b
        return apply

    def restore():
        router_kernel.MAX_TILE_K, router_kernel.default_chunk = shipped

    for budget in (4.0, 3.0):
        ab_rounds(model, prompt, res, save, f"router_chunk_ab_{budget:g}", budget, 3,
                  [(dict(chunk=c), use(c)) for c in RCHUNKS], restore)


SKIP_BUDGETS = tuple(float(b) for b in os.environ.get("SKIP_BUDGETS", "2").split())


def skip_glue_ab(model, prompt, res, save):
    """What the router launches and the attention cost (int8 engine, ``SKIP_BUDGETS``): the step as shipped, without
    the down router launch (SiLU·up and x's int8 codes), without every router launch (also the norms before q/k/v
    and gate/up) and without the attention kernel, alternating rounds. Without them the linears read stale inputs,
    so the logits are meaningless (and at a routed budget the counts too): a bound on what folding that work into
    other launches could save."""
    from mobiquant.kernels import decode_step
    from mobiquant.kernels import router as router_kernel

    real, real_attn = router_kernel._route_counts_kernel, decode_step._decode_attention_kernel

    class Skip:  # kernel[grid](..., PRO=kind, ...) not launched for kinds in `skip` (-1: a launch without PRO)
        def __init__(self, real, skip):
            self.real, self.skip = real, skip

        def __getitem__(self, grid):
            launch = self.real[grid]
            return lambda *a, **kw: None if kw.get("PRO", -1) in self.skip else launch(*a, **kw)

    def use(skip, attn=False):  # attn: the attention kernel not launched either (o_proj then reads stale codes)
        def apply():
            router_kernel._route_counts_kernel = Skip(real, skip) if skip else real
            decode_step._decode_attention_kernel = Skip(real_attn, (-1,)) if attn else real_attn
        return apply

    for budget in SKIP_BUDGETS:
        ab_rounds(model, prompt, res, save, f"skip_glue_ab_{budget:g}", budget, 3,
                  [(dict(skip="none"), use(())), (dict(skip="down"), use((2,))), (dict(skip="all"), use((1, 2))),
                   (dict(skip="attention"), use((), True))], use(()))


def b4_parts(model, prompt, res, save):
    eng = DecodeEngine(model, 1024, int8_activations=True)
    eng.set_budget(4.0)
    eng.prefill(prompt)
    _, counts = eng.decode()
    counts = counts.reshape(-1).clone()
    res["b4_counts"] = {str(k): int((counts == k).sum()) for k in range(1, 5)}
    DB.log(f"budget 4 counts of one step: {res['b4_counts']}")
    cases = (("budget_4_routed", eng.set_budget, 4.0), ("budget_4_counts_given", eng.set_counts, counts),
             ("k2_given", eng.set_k, 2))
    res["b4_parts"] = rows = []
    for rnd in range(2):
        for name, setter, arg in cases:
            setter(arg)
            rows.append(dict(case=name, round=rnd, step_ms=step_ms(eng, prompt)))
            DB.log(f"round {rnd} int8 {name}: {rows[-1]['step_ms']:.4f} ms/step")
            save()
    del eng
    torch.cuda.empty_cache()
    from mobiquant.kernels import router

    args = router.RoutePlan.args
    try:  # the linears read the plan's flags: all given, from counts_in (the routed step's counts)
        ones = {}  # made in the warm-up runs before the capture, so the graph holds no fill launch

        def given_all(p):
            key = (p.given.data_ptr(), p.given.numel())
            if key not in ones:
                ones[key] = torch.ones_like(p.given, dtype=torch.int8)
            return [*args(p)[:7], ones[key], *args(p)[8:]]

        router.RoutePlan.args = given_all
        eng = DecodeEngine(model, 1024, int8_activations=True, capture=False)
        eng.set_budget(4.0)
        eng.counts_in.copy_(counts)
        eng.capture()
        for rnd in range(2):
            rows.append(dict(case="router_partials_linears_given", round=rnd, step_ms=step_ms(eng, prompt)))
            DB.log(f"round {rnd} int8 router partials, linears given: {rows[-1]['step_ms']:.4f} ms/step")
            save()
        _, c2 = eng.decode()
        res["b4_router_side_counts_equal"] = bool(torch.equal(c2.reshape(-1), counts))
    finally:
        router.RoutePlan.args = args


def main():
    import transformers

    res = dict(info=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         transformers=transformers.__version__,
                         date=datetime.datetime.now().isoformat(timespec="seconds"), layers=LAYERS),
               step_ms={}, profile={})
    out = OUT / os.environ.get("OUT_NAME", "step_overhead_h100.json")

    def save():
        out.write_text(json.dumps(res, indent=1))

    model = DB.build_model(LAYERS)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128256, (32,), generator=g).cuda()
    with torch.no_grad():
        quantize_(model, MoBiQuantConfig(slice_bits=(2, 2, 2, 2), group_size=128))
        DB.attach_random_routers(model)
        if "glue_ab" in PARTS:
            flag_ab(model, prompt, res, save)
        if "attention_router" in PARTS:  # seventeenth session: o_proj's router in the attention's epilogue
            flag_ab(model, prompt, res, save, "attention_router", "attention_router_ab")
        if "given_graph" in PARTS:  # nineteenth session: no router launches where no count is routed
            flag_ab(model, prompt, res, save, "given_graph", "given_graph_ab", int8s=(True,),
                    cases=(("budget_2", "set_budget", 2.0), ("budget_8", "set_budget", 8.0), ("k2", "set_k", 2),
                           ("budget_4", "set_budget", 4.0)))
        if "fold" in PARTS:  # twenty-first session: the norms before q/k/v and gate/up in o_proj's, down_proj's tiles
            flag_ab(model, prompt, res, save, "norm_fold", "norm_fold_ab", int8s=(True,),
                    cases=(("budget_2", "set_budget", 2.0), ("budget_4", "set_budget", 4.0), ("k2", "set_k", 2)),
                    engine_kw=dict(norm_fold=True))
        if "fdiag" in PARTS:  # norm_fold 0 / 1 / 2 (2: the folds computed into scratch, unused: their cost alone)
            fold_modes(model, prompt, res, save)
        if "early" in PARTS:
            early_ab(model, prompt, res, save)
        if "rwarps" in PARTS:
            router_warps_ab(model, prompt, res, save)
        if "rchunk" in PARTS:
            router_chunk_ab(model, prompt, res, save)
        if "skipglue" in PARTS:
            skip_glue_ab(model, prompt, res, save)
        if "b4parts" in PARTS:
            b4_parts(model, prompt, res, save)
            torch.cuda.empty_cache()
        if "modab" in PARTS:
            module_ab(model, prompt, res, save)
        if "attn" in PARTS:
            attn_ab(model, prompt, res, save)
        if "argmax" in PARTS:
            argmax_ab(model, prompt, res, save)
        if "nopdl" in PARTS:
            nopdl_profile(model, prompt, res, save)
        if "steps" in PARTS:  # the step only, budgets 2 and 4: to compare trees run one after the other
            for int8 in (e == "int8" for e in os.environ.get("STEP_ENGINES", "fp16 int8").split()):
                eng = DecodeEngine(model, 1024, int8_activations=int8)
                for b in (float(b) for b in os.environ.get("STEP_BUDGETS", "2 4").split()):
                    eng.set_budget(b)
                    name = f"{'int8' if int8 else 'fp16'}_budget_{b:g}"
                    res["step_ms"][name] = ms = step_ms(eng, prompt, rounds=5)
                    DB.log(f"{name}: {ms:.4f} ms/step")
                    save()
                del eng
                torch.cuda.empty_cache()
        for int8 in ((False, True) if "overhead" in PARTS else ()):
            tag = "int8" if int8 else "fp16"
            eng = DecodeEngine(model, 1024, int8_activations=int8)  # router_glue on (the default)
            for name, setter, arg in (("budget_2", "set_budget", 2.0), ("budget_4", "set_budget", 4.0),
                                      ("k1_router_launches", "set_k", 1), ("k2_router_launches", "set_k", 2)):
                getattr(eng, setter)(arg)
                res["step_ms"][f"{tag}_{name}"] = ms = step_ms(eng, prompt)
                DB.log(f"{tag} {name}: {ms:.3f} ms/step")
                if name == "budget_2":
                    res["profile"][f"{tag}_{name}"] = DB.kernel_profile(eng, prompt)
                save()
            if not int8:  # no router launch at all (the int8 path needs the router launch to quantize x)
                for grp in (g for blk in eng.groups for g in blk.values() if g is not None):
                    grp.routed = False
                eng.capture()
                for k in (1, 2):
                    eng.set_k(k)
                    res["step_ms"][f"{tag}_k{k}_no_router"] = ms = step_ms(eng, prompt)
                    DB.log(f"{tag} k{k} no router: {ms:.3f} ms/step")
                    if k == 1:
                        res["profile"][f"{tag}_k1_no_router"] = DB.kernel_profile(eng, prompt)
                    save()
            del eng
            torch.cuda.empty_cache()
    DB.log("\n| case | ms/step |\n|---|---|")
    for n, v in res["step_ms"].items():
        DB.log(f"| {n} | {v:.3f} |")
    for n, p in res["profile"].items():
        DB.log(f"\n{n}: kernels {p['kernel_us_per_step'] / 1e3:.3f} ms in {p['kernels_per_step']:.0f} launches")
        for c, v in p["categories"].items():
            DB.log(f"    {c:18s} {v['us'] / 1e3:7.3f} ms  {v['kernels']:6.0f} launches")
        for t in p["top"][:12]:
            DB.log(f"      {t['us']:8.1f} us {t['calls']:5.0f}x  {t['name'][:90]}")
    save()


if __name__ == "__main__":
    main()
