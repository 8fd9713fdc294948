"""End-to-end decode speed of a random-weight LLaMA-3-8B-shaped model on the decode engine (issue 5, deliverable 5).

    PYTHONUNBUFFERED=1 python benchmarks/decode.py                       # full run, writes the JSON below
    python benchmarks/decode.py --layers 4 --tokens 32                   # smoke test
    python benchmarks/decode.py --compile                                # also the torch.compile'd engine step
    PYTHONUNBUFFERED=1 python benchmarks/decode.py --profile             # where a decode step's time goes
    PYTHONUNBUFFERED=1 python benchmarks/decode.py --pdl-ab              # glue + router PDL off / on, step times
    PYTHONUNBUFFERED=1 python benchmarks/decode.py --router-ab           # router finished in v7 off / on
    python benchmarks/decode.py --glue-pdl 0                             # the engine as before the glue PDL

Model: LlamaConfig of LLaMA-3-8B (hidden 4096, 32 layers, 32 heads / 8 kv heads, MLP 14336, vocab 128256), random
weights (HF init) in fp16 on the GPU. Nothing is downloaded; speed does not depend on the weights' values.

Rows (batch 1, greedy, a 32-token random prompt, then --tokens new tokens):
* HF ``generate`` on the fp16 model (eager, DynamicCache): the library baseline.
* the decode engine (mobiquant/engine.py) on the same fp16 model: static KV cache, CUDA graph, cuBLAS linears.
* ``quantize_`` (slices 2,2,2,2, group 128) + random MoBiRoute routers (hidden 16) whose calibration scores are
  their own outputs on random inputs, thresholds attached in "layer" mode (route.attach_thresholds_), so that every
  budget between 2 and 8 bits is realised on average; then the engine at budgets 2, 3, 4, 6, 8 bits (routed) and at
  uniform k = 1..4 (set_k: the same graph, the routers' counts overridden on the device).
* the engine with ``int8_activations`` (the router launch rounds x to int8 per group of 128, the linears run the
  int8 tensor-core path) at the same budgets, and its first step at budget 4 against the fp16-activation engine's
  (counts equal, logits' relative difference, same argmax); --no-int8 skips it.
* the engines with ``head_slices`` (lm_head sliced like the linears and run at a fixed count, --head-slices, by
  default 3 and 4: 6 and 8 bits), fp16 and int8 activations, at the same budgets, and each one's first step at
  budget 4 against the same engine with the full-precision head (counts equal, logits' relative difference, same
  argmax). lm_head is 1.05 GB in fp16: 0.37 ms of every step (benchmarks/experiments/head_gemv.py).
* elastic_generate (the app's API) at budget 4: the engine plus one host read of logits and counts per token.
* HF ``generate`` on the quantized model at k = 2 (eager forward; MoBiQuantLinear calls the kernels' custom op).

--pdl-ab (writes results/decode_pdl_ab_h100.json instead): the step's graph recaptured with the glue kernels' and
the router's programmatic dependent launch off and on (decode_step.PDL, router.PDL_WAIT), alternating 3 times, ms/step
of each at fp16, budgets 2 and 4 and k = 2 (medians of graph replays), and the logits of 4 greedy steps compared.

--router-ab (writes results/decode_router_ab_h100.json instead): the engine's ``fuse_router`` (the routers' fc1
partials only, each v7 launch finishing its counts) off and on, alternating 3 times with one capture each, ms/step
at budgets 2 and 4, at k = 2, and at budget 4 with the counts given (the counts of one routed step, fixed: the mixed k
of the linears without the routing work), plus the logits and counts of 4 greedy steps compared (must be equal).

--profile (writes results/decode_profile_h100.json instead): one engine per model, the step's CUDA graph recaptured
for each variant (fp16: torch glue / fused glue; quantized at budget 4: the first router kernel (one program per
router), then the split router, the fused glue, q/k/v and gate/up in one launch each, the router's PDL trigger; at
k = 2 with and without router launches), each timed as the median of graph replays,
and a torch.profiler trace (CUDA activity) of graph replays summed per kernel and per category.

tok/s = new tokens / wall time of the decode loop (prefill excluded; median of --reps runs). The engine's greedy loop
replays the graph back to back (the argmax is fed back on the device) and synchronises once at the end.
Budget switch: host time of ``set_budget`` (device writes only), the first step after a switch against a steady
step, and the number of graph captures before and after all switches (must not change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import mobiquant
from mobiquant import MoBiQuantConfig, precision, quantize_
from mobiquant.engine import DecodeEngine, _fingerprint
from mobiquant.generate import BudgetControl, elastic_generate
from mobiquant.nn.router import MoBiRoute
from mobiquant.route import attach_thresholds_

BUDGETS = (2.0, 3.0, 4.0, 6.0, 8.0)


def log(*a):
    print(*a, flush=True)


class IdTokenizer:
    """Enough of a tokenizer for elastic_generate: ids <-> 't<id>' words."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids)


def build_model(layers: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def attach_random_routers(model, hidden: int = 16, samples: int = 512):
    """Random MoBiRoute routers; calibration scores = their outputs on random inputs; layer-mode thresholds."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in mobiquant.quantized_linears(model).values():
        r = MoBiRoute(m.in_features, m.num_slices, hidden, device="cuda")
        r.fc1.weight.data.normal_(0, m.in_features ** -0.5, generator=g)
        r.fc1.bias.data.zero_()
        r.fc2.weight.data.normal_(0, hidden ** -0.5, generator=g)
        r.fc2.bias.data.zero_()
        r.half()  # routers are stored in fp16 (the forward runs in fp32)
        x = torch.randn(samples, m.in_features, device="cuda", generator=g)
        r.set_calibration_scores_(r(x).detach())
        m.router = r
    t0 = time.perf_counter()
    attach_thresholds_(model, "layer", "nested")
    return time.perf_counter() - t0


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def engine_tps(eng: DecodeEngine, prompt: torch.Tensor, n: int, reps: int, setup=None) -> dict:
    """Greedy decode of n tokens after a prefill; tok/s (median of reps), realised bits and ms per token."""
    def run():
        eng.prefill(prompt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            eng.decode()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    if setup:
        setup()
    run()  # warm-up
    secs = [run() for _ in range(reps)]
    med = statistics.median(secs)
    row = dict(tok_s=n / med, ms_per_token=1e3 * med / n, runs_s=secs)
    if eng.n_linears:  # realised bits of the decode steps (a separate, host-synchronised pass)
        eng.prefill(prompt)
        bits = []
        for _ in range(min(n, 32)):
            _, c = eng.decode()
            bits.append(eng.summarize(c.cpu()[None])[2])
        row["bits"] = statistics.mean(bits)
    return row


def first_step_check(ref: DecodeEngine, eng: DecodeEngine, prompt: torch.Tensor, setup, tok: int | None = None
                     ) -> dict:
    """Both engines prefilled after ``setup``, then one decode step each (input ``tok``, or each one's greedy token
    after the prompt): the fraction of counts equal, ``eng``'s logits' relative difference from ``ref``'s, and
    whether the argmax is the same."""
    for e in (ref, eng):
        setup(e)
        e.prefill(prompt)
    (lr, cr), (le, ce) = ref.decode(tok), eng.decode(tok)
    return dict(counts_equal_fraction=(cr == ce).float().mean().item(),
                logits_rel_diff=((le - lr).norm() / lr.norm()).item(),
                argmax_equal=int(le.argmax()) == int(lr.argmax()))


def budget_rows(eng: DecodeEngine, name: str, prompt: torch.Tensor, args, rows: dict) -> None:
    """rows[f"{name}_budget_{b}"]: tok/s and realised bits of ``eng`` at every budget."""
    for b in BUDGETS:
        r = rows[f"{name}_budget_{b:g}"] = engine_tps(eng, prompt, args.tokens, args.reps,
                                                      lambda b=b: eng.set_budget(b))
        log(f"{name} budget {b:g}", r["tok_s"], r["bits"])


def int8_engine_rows(model, eng: DecodeEngine, prompt: torch.Tensor, max_len: int, args, rows: dict, res: dict
                     ) -> DecodeEngine:
    """A second engine with ``int8_activations``: tok/s at every budget, and its first decode step against the
    fp16-activation engine's: at k = 2 for every linear (the same weights, only x rounded) and at budget 4, where a
    router after the first block may flip a count when its score lies within the rounding's effect of τ; its
    budget switch (``switch_latency``: with ``norm_fold`` the forced budgets replay a second graph). Returns the
    engine."""
    t0 = time.perf_counter()
    eng8 = DecodeEngine(model, max_len, int8_activations=True)
    rows["engine_int8_act_build_s"] = time.perf_counter() - t0
    setups = (("k2", lambda e: e.set_k(2)), ("budget_4", lambda e: e.set_budget(4.0)))
    res["check_int8_act"] = {name: first_step_check(eng, eng8, prompt, setup) for name, setup in setups}
    log("int8 activations vs fp16, first decode step:", res["check_int8_act"])
    budget_rows(eng8, "engine_int8_act", prompt, args, rows)
    rows["switch_int8_act"] = switch_latency(eng8, prompt)  # two graphs (norm_fold): a switch picks one
    log("switch, int8 activations", rows["switch_int8_act"])
    return eng8


def head_engine_rows(model, eng: DecodeEngine, prompt: torch.Tensor, max_len: int, args, rows: dict, res: dict,
                     head: int, int8: bool):
    """An engine with ``head_slices=head`` (lm_head sliced and run at that count), fp16 or int8 activations:
    tok/s at every budget, and its first decode step at budget 4 against ``eng`` (the same activations, the
    full-precision head): counts equal, logits' relative difference, same argmax."""
    t0 = time.perf_counter()
    engh = DecodeEngine(model, max_len, int8_activations=int8, head_slices=head)
    name = f"engine{'_int8_act' if int8 else ''}_head{head}"
    rows[f"{name}_build_s"] = time.perf_counter() - t0
    # the same input token after the prompt (the heads' greedy tokens there may differ)
    res[f"check_{name}"] = first_step_check(eng, engh, prompt, lambda e: e.set_budget(4.0), int(prompt[-1]))
    log(f"{name} vs the full-precision head, first decode step at budget 4:", res[f"check_{name}"])
    budget_rows(engh, name, prompt, args, rows)


def hf_generate_tps(model, prompt: torch.Tensor, n: int, reps: int) -> dict:
    ids = prompt[None]

    def gen(k):
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    gen(4)  # warm-up
    secs = timed(lambda: gen(n), reps)
    pre = timed(lambda: gen(1), reps)  # prefill + 1 token, subtracted
    med = statistics.median(secs) - statistics.median(pre)
    return dict(tok_s=(n - 1) / med, ms_per_token=1e3 * med / (n - 1), runs_s=secs, prefill_s=pre)


def switch_latency(eng: DecodeEngine, prompt: torch.Tensor, reps: int = 50) -> dict:
    """Host time of set_budget, the first decode step after a switch vs a steady one, captures before/after."""
    captures = eng.captures
    eng.set_budget(4.0)
    eng.prefill(prompt)
    host, first, steady = [], [], []
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    for i in range(reps):
        b = BUDGETS[i % len(BUDGETS)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.set_budget(b)
        host.append(time.perf_counter() - t0)
        ev[0].record()
        eng.decode()
        ev[1].record()
        eng.decode()
        ev[2].record()
        torch.cuda.synchronize()
        first.append(ev[0].elapsed_time(ev[1]))
        steady.append(ev[1].elapsed_time(ev[2]))
        if eng.pos.item() > eng.max_seq_len - 8:
            eng.prefill(prompt)
    return dict(set_budget_host_ms=1e3 * statistics.median(host), set_budget_host_ms_max=1e3 * max(host),
                first_step_after_switch_ms=statistics.median(first), steady_step_ms=statistics.median(steady),
                captures_before=captures, captures_after=eng.captures)


def elastic_generate_tps(model, prompt: torch.Tensor, n: int) -> dict:
    def run():
        steps = list(elastic_generate(model, IdTokenizer(), prompt, BudgetControl(4.0), max_new_tokens=n))
        return steps

    run()  # warm-up (engine already built)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = run()
    dt = time.perf_counter() - t0 - steps[0].seconds
    return dict(tok_s=(n - 1) / dt, bits=statistics.mean(s.bits for s in steps[1:]),
                first_step_s=steps[0].seconds)


# ------------------------------------------------------------------------------------------------ --profile
CATEGORIES = (  # kernel name substring -> category, first match wins
    ("_route_counts", "router"), ("_sliced_gemv", "quantized linears"), ("_sliced_gemm", "quantized linears"),
    ("_add_rms_norm", "fused glue"), ("_rope_kv", "fused glue"), ("_decode_attention", "fused glue"),
    ("_silu_mul", "fused glue"), ("gemm", "cuBLAS"), ("gemv", "cuBLAS"), ("xmma", "cuBLAS"), ("cutlass", "cuBLAS"),
    ("nvjet", "cuBLAS"), ("splitKreduce", "cuBLAS"),
)


def category(name: str) -> str:
    return next((c for key, c in CATEGORIES if key in name), "torch glue")


def graph_step_ms(eng: DecodeEngine, prompt: torch.Tensor, steps: int = 100, reps: int = 3) -> float:
    """Median over reps of (event time of `steps` back-to-back graph replays) / steps."""
    out = []
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for _ in range(reps):
        eng.prefill(prompt)
        ev[0].record()
        for _ in range(steps):
            eng.decode()
        ev[1].record()
        torch.cuda.synchronize()
        out.append(ev[0].elapsed_time(ev[1]) / steps)
    return statistics.median(out)


def kernel_profile(eng: DecodeEngine, prompt: torch.Tensor, steps: int = 5) -> dict:
    """torch.profiler over `steps` graph replays: per kernel name (calls and µs per step) and per category."""
    from torch.profiler import ProfilerActivity, profile

    eng.prefill(prompt)
    eng.decode()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.decode()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        d = kernels.setdefault(e.name, [0, 0.0])
        d[0] += 1
        d[1] += e.time_range.elapsed_us()
    rows = sorted(((n, c / steps, us / steps) for n, (c, us) in kernels.items()), key=lambda r: -r[2])
    cats = {}
    for n, c, us in rows:
        k = cats.setdefault(category(n), [0.0, 0.0])
        k[0] += c
        k[1] += us
    return dict(kernels_per_step=sum(r[1] for r in rows), kernel_us_per_step=sum(r[2] for r in rows),
                categories={k: dict(kernels=v[0], us=v[1]) for k, v in sorted(cats.items(), key=lambda kv: -kv[1][1])},
                top=[dict(name=n[:120], calls=c, us=us) for n, c, us in rows[:25]])


def results_file(args, mode_file: str) -> Path:
    """Where a mode writes its JSON: ``mode_file`` beside the default output, or --out if the user named one."""
    return Path(args.out).with_name(mode_file) if args.out.endswith("decode_h100.json") else Path(args.out)


def saver(res: dict, out: Path):
    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    return save


def model_and_prompt(args):
    """The random-weight model and the seeded random prompt every mode uses."""
    model = build_model(args.layers)
    g = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 128256, (args.prompt,), generator=g).cuda()


def ab_row(res: dict, name: str, off: list[float], on: list[float], note: str) -> None:
    """One A/B case: the step times of every round off and on, their medians, and a table row."""
    res["median_step_ms"][name] = dict(off=statistics.median(off), on=statistics.median(on), off_all=off, on_all=on)
    log(f"| {name} | {' / '.join(f'{x:.3f}' for x in off)} | {' / '.join(f'{x:.3f}' for x in on)} | "
        f"{statistics.median(off):.3f} -> {statistics.median(on):.3f} ({note}) |")


def profile_main(args, info):
    from mobiquant.kernels import router as router_kernel

    res = dict(info=info, variants={})
    save = saver(res, results_file(args, "decode_profile_h100.json"))
    shipped_chunk = router_kernel.CHUNK_K

    model, prompt = model_and_prompt(args)
    V = res["variants"]

    def variant(name, eng, setup, trace=True, check=None):
        eng.fuse_glue = setup.get("fuse", True)
        eng.fuse_linears = setup.get("linears", True)
        eng.fuse_router = setup.get("router", False) and eng.n_linears > 0
        router_kernel.CHUNK_K = setup.get("chunk", shipped_chunk)
        router_kernel.PDL_TRIGGER = setup.get("trigger", True)
        eng.capture()
        if "k" in setup:
            eng.set_k(setup["k"])
        elif "budget" in setup:
            eng.set_budget(setup["budget"])
        r = V[name] = dict(setup={k: v for k, v in setup.items()}, step_ms=graph_step_ms(eng, prompt))
        if trace:
            r["profile"] = kernel_profile(eng, prompt)
        eng.prefill(prompt)
        logits = [eng.decode()[0].clone() for _ in range(4)]
        if check is not None:  # the same greedy path as the reference variant: logits close
            r["max_abs_logit_diff_vs_" + check[0]] = max((a - b).abs().max().item() for a, b in zip(logits, check[1]))
        log(f"{name}: {r['step_ms']:.3f} ms/step" + (f", kernels {r['profile']['kernel_us_per_step'] / 1e3:.3f} ms "
            f"in {r['profile']['kernels_per_step']:.0f} launches" if trace else "")
            + "".join(f", {k} {v:.3g}" for k, v in r.items() if k.startswith("max_abs")))
        if trace:
            for c, v in r["profile"]["categories"].items():
                log(f"    {c:18s} {v['us'] / 1e3:7.3f} ms  {v['kernels']:6.0f} launches")
        save()
        return logits

    # the variants, in the order the changes were made: the first router kernel (one program per router, "router1"),
    # the split router, the fused glue, q/k/v and gate/up in one launch each, the router's PDL trigger
    first = dict(fuse=False, linears=False, chunk=1 << 20, trigger=False)
    with torch.no_grad():
        eng = DecodeEngine(model, 1024, capture=False)
        ref = ("fp16_torch_glue", variant("fp16_torch_glue", eng, dict(fuse=False)))
        variant("fp16_fused_glue", eng, dict(fuse=True), check=ref)
        del eng
        torch.cuda.empty_cache()
        quantize_(model, MoBiQuantConfig(slice_bits=(2, 2, 2, 2), group_size=128))
        attach_random_routers(model)
        eng = DecodeEngine(model, 1024, capture=False)
        b4 = dict(budget=4.0)
        ref = ("q_b4_router1_torch_glue", variant("q_b4_router1_torch_glue", eng, b4 | first))
        variant("q_b4_split_router_torch_glue", eng, b4 | first | dict(chunk=256), check=ref)
        variant("q_b4_split_router_fused_glue", eng, b4 | first | dict(chunk=256, fuse=True), check=ref)
        variant("q_b4_+fused_linears", eng, b4 | dict(trigger=False), check=ref)
        variant("q_b4_+router_pdl_trigger", eng, b4, check=ref)
        variant("q_b4_+fused_router", eng, b4 | dict(router=True), check=ref)  # everything on: the default
        variant("q_k2_router1_torch_glue", eng, dict(k=2) | first, trace=False)
        variant("q_k2_all_on", eng, dict(k=2), trace=False)
        variant("q_k2_+fused_router", eng, dict(k=2, router=True), trace=False)
        for grp in (g for blk in eng.groups for g in blk.values() if g is not None):
            grp.routed = False  # counts straight from counts_in: no router launch at all
        variant("q_k2_no_router_torch_glue", eng, dict(k=2) | first | dict(chunk=256), trace=False)
        variant("q_k2_no_router_all_on", eng, dict(k=2))
    router_kernel.PDL_TRIGGER = True
    router_kernel.CHUNK_K = shipped_chunk
    log("\n| variant | ms/step | kernel ms | launches |")
    log("|---|---|---|---|")
    for n, r in V.items():
        p = r.get("profile")
        log(f"| {n} | {r['step_ms']:.3f} | " + (f"{p['kernel_us_per_step'] / 1e3:.3f} | {p['kernels_per_step']:.0f} |"
                                                if p else "– | – |"))
    save()

def pdl_ab_main(args, info):
    from mobiquant.kernels import decode_step
    from mobiquant.kernels import router as router_kernel

    res = dict(info=info, rounds=[], logits_max_abs_diff_on_vs_off={})
    save = saver(res, results_file(args, "decode_pdl_ab_h100.json"))

    def set_pdl(on):
        decode_step.PDL = router_kernel.PDL_WAIT = on

    model, prompt = model_and_prompt(args)
    rounds = res["rounds"]
    table = {}

    def measure(eng, setup):
        if setup is not None:
            setup()
        ms = graph_step_ms(eng, prompt)
        eng.prefill(prompt)
        logits = [eng.decode()[0].clone() for _ in range(4)]
        return ms, logits

    def rounds_of(eng, setups):
        for rnd in range(3):
            for on in (False, True):
                set_pdl(on)
                eng.capture()  # one capture per round and setting; the setups only write device tensors
                for name, setup in setups.items():
                    ms, lg = measure(eng, setup)
                    table.setdefault((name, on), []).append(ms)
                    if rnd == 0:
                        table[(name, on, "logits")] = lg
                    log(f"round {rnd} pdl={int(on)} {name}: {ms:.4f} ms/step")
                    rounds.append(dict(round=rnd, pdl=on, case=name, step_ms=ms))
                    save()

    with torch.no_grad():
        eng = DecodeEngine(model, 1024, capture=False)
        rounds_of(eng, {"fp16": None})
        del eng
        torch.cuda.empty_cache()
        quantize_(model, MoBiQuantConfig(slice_bits=(2, 2, 2, 2), group_size=128))
        attach_random_routers(model)
        eng = DecodeEngine(model, 1024, capture=False)
        setups = {"budget_4": lambda: eng.set_budget(4.0), "budget_2": lambda: eng.set_budget(2.0),
                  "k_2": lambda: eng.set_k(2)}
        rounds_of(eng, setups)
    set_pdl(True)
    res["median_step_ms"] = {}
    log("\n| case | glue+router PDL off, ms/step (3 rounds) | on | median off -> on |")
    log("|---|---|---|---|")
    for name in ["fp16"] + list(setups):
        off, on = table[(name, False)], table[(name, True)]
        d = max((a - b).abs().max().item() for a, b in zip(table[(name, False, "logits")],
                                                          table[(name, True, "logits")]))
        res["logits_max_abs_diff_on_vs_off"][name] = d
        ab_row(res, name, off, on, f"logits diff {d:.3g}")
    save()


def router_ab_main(args, info):
    res = dict(info=info, rounds=[], logits_max_abs_diff_on_vs_off={}, counts_equal_on_vs_off={})
    save = saver(res, results_file(args, "decode_router_ab_h100.json"))

    model, prompt = model_and_prompt(args)
    table = {}
    with torch.no_grad():
        quantize_(model, MoBiQuantConfig(slice_bits=(2, 2, 2, 2), group_size=128))
        attach_random_routers(model)
        eng = DecodeEngine(model, 1024, capture=False)
        eng.fuse_router = False
        eng.capture()
        eng.set_budget(4.0)
        eng.prefill(prompt)
        fixed = eng.decode()[1].clone()  # the counts of one routed step at budget 4, given from now on
        res["b4_given_counts_mean"] = fixed.float().mean().item()
        res["b4_given_counts_histogram"] = [int((fixed == k).sum()) for k in range(1, 5)]
        setups = {"budget_4": lambda: eng.set_budget(4.0), "budget_2": lambda: eng.set_budget(2.0),
                  "k_2": lambda: eng.set_k(2), "b4_counts_given": lambda: eng.set_counts(fixed)}
        for rnd in range(3):
            for on in (False, True):
                eng.fuse_router = on
                eng.capture()
                for name, setup in setups.items():
                    setup()
                    ms = graph_step_ms(eng, prompt)
                    table.setdefault((name, on), []).append(ms)
                    if rnd == 0:
                        eng.prefill(prompt)
                        lg, cs = [], []
                        for _ in range(4):
                            a, b = eng.decode()
                            lg.append(a.clone())
                            cs.append(b.clone())
                        table[(name, on, "out")] = (lg, cs)
                    log(f"round {rnd} fuse_router={int(on)} {name}: {ms:.4f} ms/step")
                    res["rounds"].append(dict(round=rnd, fuse_router=on, case=name, step_ms=ms))
                    save()
    res["median_step_ms"] = {}
    log("\n| case | fuse_router off, ms/step (3 rounds) | on | median off -> on |")
    log("|---|---|---|---|")
    for name in setups:
        off, on = table[(name, False)], table[(name, True)]
        (l0, c0), (l1, c1) = table[(name, False, "out")], table[(name, True, "out")]
        d = max((a - b).abs().max().item() for a, b in zip(l0, l1))
        eq = all(torch.equal(a, b) for a, b in zip(c0, c1))
        res["logits_max_abs_diff_on_vs_off"][name] = d
        res["counts_equal_on_vs_off"][name] = eq
        ab_row(res, name, off, on, f"logits diff {d:.3g}, counts equal {eq}")
    save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time the engine with a torch.compile'd step")
    ap.add_argument("--profile", action="store_true", help="profile one decode step per variant (see docstring)")
    ap.add_argument("--pdl-ab", action="store_true", help="glue + router PDL off / on, step times (see docstring)")
    ap.add_argument("--router-ab", action="store_true", help="fuse_router off / on, step times (see docstring)")
    ap.add_argument("--glue-pdl", type=int, default=1, help="0: glue and router launched without PDL (as before)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8-activation engine's rows")
    ap.add_argument("--head-slices", default="3,4",
                    help="engines with lm_head sliced at these counts (head_slices), comma-separated; '' = none")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_h100.json"))
    args = ap.parse_args()
    from mobiquant.kernels import decode_step
    from mobiquant.kernels import router as router_kernel

    decode_step.PDL = router_kernel.PDL_WAIT = bool(args.glue_pdl)
    import transformers
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), layers=args.layers,
                new_tokens=args.tokens, prompt_tokens=args.prompt, reps=args.reps,
                config="LLaMA-3-8B shape, random weights, fp16; slices 2,2,2,2, group 128, routers hidden 16",
                engine="fused decode glue, q/k/v and gate/up one launch each, split router with PDL trigger, "
                "router finished inside the linears (fuse_router), norms and SiLU·up inside the router launches "
                "(router_glue), the rotary inside the q/k/v launch where its tiles hold whole heads (fuse_rope), "
                "the step's tail (fp32 logits, greedy token, next position) in one launch (greedy_step), o_proj's "
                "router in the attention's epilogue (attention_router); int8 activations: where no count is routed, "
                "a second graph with the norms before q/k/v and gate/up in o_proj's and down_proj's tiles (norm_fold)"
                + (", fuse_router off / on alternately (A/B)" if args.router_ab else "")
                + (", glue and router PDL off / on alternately (A/B)" if args.pdl_ab
                   else ", glue and router launched with PDL" if args.glue_pdl else ", glue and router without PDL"))
    log(info)
    if args.profile:
        return profile_main(args, info)
    if args.pdl_ab:
        return pdl_ab_main(args, info)
    if args.router_ab:
        return router_ab_main(args, info)
    res = dict(info=info, rows={})
    rows = res["rows"]

    save = saver(res, Path(args.out))
    t0 = time.perf_counter()
    model, prompt = model_and_prompt(args)
    log(f"model built in {time.perf_counter() - t0:.1f} s")
    max_len = 1024 * ((args.prompt + args.tokens + 8 + 1023) // 1024)

    with torch.no_grad():
        rows["hf_generate_fp16"] = hf_generate_tps(model, prompt, args.hf_tokens, 2)
        log("hf generate fp16", rows["hf_generate_fp16"]["tok_s"])
        t0 = time.perf_counter()
        eng = DecodeEngine(model, max_len)
        rows["engine_fp16"] = engine_tps(eng, prompt, args.tokens, args.reps)
        rows["engine_fp16"]["build_s"] = time.perf_counter() - t0
        log("engine fp16", rows["engine_fp16"]["tok_s"])
        # correctness: engine fp16 greedy tokens vs HF generate greedy tokens
        ref = model.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, -16:]
        logits, _ = eng.prefill(prompt)
        toks = [int(logits.argmax())]
        for _ in range(15):
            lg, _ = eng.decode()
            toks.append(int(lg.argmax()))
        res["check_fp16_greedy_tokens_equal_hf"] = sum(a == b for a, b in zip(toks, ref.tolist()))
        log("greedy tokens equal to HF generate:", res["check_fp16_greedy_tokens_equal_hf"], "/ 16")
        del eng
        torch.cuda.empty_cache()
        save()

        t0 = time.perf_counter()
        quantize_(model, MoBiQuantConfig(slice_bits=(2, 2, 2, 2), group_size=128))
        rows["quantize_s"] = time.perf_counter() - t0
        rows["thresholds_s"] = attach_random_routers(model)
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        eng = DecodeEngine(model, max_len)
        rows["engine_build_s"] = time.perf_counter() - t0
        log(f"quantized in {rows['quantize_s']:.1f} s, thresholds {rows['thresholds_s']:.1f} s, "
            f"engine built + captured in {rows['engine_build_s']:.1f} s")
        budget_rows(eng, "engine", prompt, args, rows)
        for k in (1, 2, 3, 4):
            rows[f"engine_k{k}"] = engine_tps(eng, prompt, args.tokens, args.reps, lambda k=k: eng.set_k(k))
            log(f"engine k={k}", rows[f"engine_k{k}"]["tok_s"])
        rows["switch"] = switch_latency(eng, prompt)
        log("switch", rows["switch"])
        save()
        eng8 = None
        if not args.no_int8:  # the int8-activation option: same routers and budgets, x rounded per group of 128
            eng8 = int8_engine_rows(model, eng, prompt, max_len, args, rows, res)
            save()
        for head in [int(h) for h in args.head_slices.split(",") if h]:  # lm_head sliced, at a fixed count
            for ref in (eng, eng8):
                if ref is not None:
                    head_engine_rows(model, ref, prompt, max_len, args, rows, res, head, ref is eng8)
                    torch.cuda.empty_cache()  # the head engine's buffers and graph are gone with the function's frame
                    save()
        del eng8
        torch.cuda.empty_cache()
        model.__dict__["_mobiquant_engine"] = eng  # elastic_generate reuses it
        eng._fingerprint = _fingerprint(model)
        rows["elastic_generate_budget_4"] = elastic_generate_tps(model, prompt.cpu(), min(args.tokens, 64))
        log("elastic_generate", rows["elastic_generate_budget_4"])
        save()
        with precision(k=2):
            rows["hf_generate_quantized_k2"] = hf_generate_tps(model, prompt, min(args.hf_tokens, 16), 1)
        log("hf generate quantized k=2", rows["hf_generate_quantized_k2"]["tok_s"])
        save()
        if args.compile:
            try:
                del eng, model.__dict__["_mobiquant_engine"]
                torch.cuda.empty_cache()
                t0 = time.perf_counter()
                eng = DecodeEngine(model, max_len, compile=True)
                rows["engine_compiled_build_s"] = time.perf_counter() - t0
                for b in (2.0, 4.0, 8.0):
                    rows[f"engine_compiled_budget_{b:g}"] = engine_tps(eng, prompt, args.tokens, args.reps,
                                                                       lambda b=b: eng.set_budget(b))
                    log(f"compiled engine budget {b:g}", rows[f"engine_compiled_budget_{b:g}"]["tok_s"])
            except Exception as e:  # report, keep the other rows
                rows["engine_compiled_error"] = f"{type(e).__name__}: {e}"[:2000]
                log("compile failed:", rows["engine_compiled_error"])
            save()

    log("\n| case | tok/s | ms/token | realised bits |")
    log("|---|---|---|---|")
    for name, r in rows.items():
        if isinstance(r, dict) and "tok_s" in r:
            log(f"| {name} | {r['tok_s']:.1f} | {1e3 / r['tok_s']:.2f} | {r.get('bits', float('nan')):.3f} |")
    for key, name in (("switch", "budget switch"), ("switch_int8_act", "budget switch, int8 activations")):
        s = rows.get(key)
        if s is not None:
            log(f"{name}: set_budget {s['set_budget_host_ms']:.3f} ms host (max {s['set_budget_host_ms_max']:.3f}); "
                f"first step after switch {s['first_step_after_switch_ms']:.3f} ms vs steady "
                f"{s['steady_step_ms']:.3f} ms; captures {s['captures_before']} -> {s['captures_after']}")
    save()


if __name__ == "__main__":
    main()
