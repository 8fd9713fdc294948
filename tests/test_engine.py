"""The decode engine (mobiquant/engine.py) against the HF forward with the torch path: same logits, same slice counts,
same TokenSteps. CPU: the engine's forward runs eagerly (no CUDA graph) through the dense per-precision weights, or
through the kernels under Triton's interpreter. GPU (`pytest -m gpu tests/test_engine.py`): CUDA-graph capture, budget
changes without recapture, no host synchronisation in a step, elastic_generate on the engine."""

import pytest
import torch
from word_tokenizer import WordTokenizer

from mobiquant import RoutingTrace, precision
from mobiquant.engine import DecodeEngine, engine_steps, supported
from mobiquant.generate import BudgetControl, _precisions, elastic_generate
from mobiquant.route import attach_thresholds_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"




def hf_step(model, ids, cache, **kw):
    tr = RoutingTrace()
    with torch.no_grad(), precision(trace=tr, **kw):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float(), out.past_key_values, tr


@pytest.mark.parametrize("allocation", ["nested", "band"])
def test_prefill_and_decode_match_hf_at_budgets(tiny_model, routed_model, allocation):
    model = routed_model(tiny_model)
    attach_thresholds_(model, "layer", allocation)
    eng = DecodeEngine(model, 64)
    ids = torch.randint(0, 96, (1, 11))
    for b in (2.0, 3.0, 4.5, 5.25, 8.0):  # budgets on the engine's 1/8-bit grid: the same thresholds as the table
        eng.set_budget(b)
        ref, cache, tr = hf_step(model, ids, None, budget=b)
        logits, counts = eng.prefill(ids[0])
        slices, names, bits = eng.summarize(counts)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(slices, tr.matrix()[0])
        assert names == tr.matrix()[1] and bits == pytest.approx(tr.realized_bits(), abs=1e-12)
        for _ in range(3):  # teacher-forced decode steps against the HF DynamicCache
            tok = int(torch.randint(0, 96, (1,)))
            ref, cache, tr = hf_step(model, torch.tensor([[tok]]), cache, budget=b)
            logits, counts = eng.decode(tok)
            slices, _, bits = eng.summarize(counts[None])
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(slices, tr.matrix()[0]) and bits == pytest.approx(tr.realized_bits(), abs=1e-12)


def test_uniform_k_and_greedy_feedback(tiny_llama, routed_model):
    model = routed_model(tiny_llama)
    eng = DecodeEngine(model, 32)
    eng.set_k(2)
    ids = torch.randint(0, 96, (1, 5))
    ref, cache, _ = hf_step(model, ids, None, k=2)
    logits, counts = eng.prefill(ids[0])
    assert (counts == 2).all()
    for _ in range(4):  # decode() without a token continues from the greedy token of the last step
        tok = int(logits.argmax())
        ref, cache, _ = hf_step(model, torch.tensor([[tok]]), cache, k=2)
        logits, _ = eng.decode()
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert int(eng.pos) == 9


@pytest.mark.parametrize("mode,budget", [("router", 4.5), ("router", 3.0), ("uniform", 5.0), ("random", 3.5)])
def test_engine_steps_equal_elastic_generate(tiny_llama, routed_model, mode, budget):
    model = routed_model(tiny_llama)
    model.config.eos_token_id = None
    tok = WordTokenizer()
    kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=5)
    ref = list(elastic_generate(model, tok, "w1 w2 w3", BudgetControl(budget, mode), **kw))
    ids = torch.tensor([[1, 2, 3]])
    eng = DecodeEngine(model, 32)
    got = list(engine_steps(eng, tok, ids, BudgetControl(budget, mode), _precisions(model), kw["max_new_tokens"],
                            kw["temperature"], kw["top_p"], kw["seed"], set()))
    assert [s.token_id for s in got] == [s.token_id for s in ref]
    for a, b in zip(got, ref):
        assert (a.index, a.text, a.budget, a.mode, a.linears) == (b.index, b.text, b.budget, b.mode, b.linears)
        assert torch.equal(a.slices, b.slices) and a.bits == pytest.approx(b.bits, abs=1e-12)
        assert a.prob == pytest.approx(b.prob, abs=1e-5) and [t for t, _ in a.top] == [t for t, _ in b.top]
    assert not eng.lock.locked()


def test_kernel_path_matches_dense_path(tiny_llama, routed_model):
    pytest.importorskip("triton")
    model = routed_model(tiny_llama).half().to(DEVICE)
    ek = DecodeEngine(model, 16, use_kernels=True, capture=False)  # CPU: the kernels in the interpreter
    ed = DecodeEngine(model, 16, use_kernels=False, capture=False)
    ids = torch.randint(0, 96, (4,), device=DEVICE)
    for e in (ek, ed):
        e.set_k(3)
    (l1, _), (l2, _) = ek.prefill(ids), ed.prefill(ids)
    torch.testing.assert_close(l1, l2, atol=2e-3 * l2.abs().max().item(), rtol=0)
    for e in (ek, ed):
        e.set_budget(5.0)
    (l1, c1), (l2, c2) = ek.decode(7), ed.decode(7)  # one token: the fused router kernel
    assert (c1 == c2).float().mean() > 0.9  # fp16 activations: a score next to τ may fall either side
    assert torch.isfinite(l1).all()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_fused_decode_glue_matches_torch_glue(fixture, routed_model, request):
    """fuse_glue (add_rms_norm, rope_kv, decode_attention, silu_mul) and fuse_linears (q/k/v and gate/up in one
    launch each) against the same engine with the torch glue and one launch per linear: the same kernels otherwise,
    fp16, a budget and uniform k, 4 decode steps each (qwen2: q/k/v biases)."""
    pytest.importorskip("triton")
    model = routed_model(request.getfixturevalue(fixture)).half().to(DEVICE)
    ef = DecodeEngine(model, 24, use_kernels=True, capture=False, fuse_glue=True)  # q/k/v, gate/up: one launch
    et = DecodeEngine(model, 24, use_kernels=True, capture=False, fuse_glue=False)
    assert ef.fuse_glue and ef.fuse_linears and not et.fuse_glue and ef.multi[0].keys() == {"qkv", "gu"}
    agree = []
    for setup in (lambda e: e.set_budget(5.0), lambda e: e.set_k(2)):  # decode steps from position 0, no prefill
        for e in (ef, et):
            setup(e)
        for _ in range(4):
            tok = int(torch.randint(0, 96, (1,)))
            (l1, c1), (l2, c2) = ef.decode(tok), et.decode(tok)
            torch.testing.assert_close(l1, l2, atol=5e-3 * l2.abs().max().item(), rtol=0)
            agree.append((c1 == c2).float().mean().item())
            assert int(ef.tok) == int(l1.argmax()) and int(ef.pos) == int(et.pos)  # greedy_step: the step's tail
        n = int(ef.pos)
        assert n == int(et.pos) and torch.equal(ef.k_cache[:, :, :n], et.k_cache[:, :, :n])  # same roundings
    assert sum(agree) / len(agree) > 0.9  # fp16 activations: a score next to τ may fall either side


@pytest.mark.parametrize("allocation", ["nested", "band"])
def test_fused_router_equals_router_kernel(tiny_llama, routed_model, allocation):
    """fuse_router (the routers' fc1 partials, then each linear finishing its counts), with and without
    router_glue (the norms and SiLU·up computed by the router launches), against the same engine with the router
    kernel finishing them: counts and logits equal, bit for bit, at budgets (nested and band), uniform k
    and given (random) counts; the trace's counts come out in the same order. The default engine also takes o_proj's
    router partials from the attention's epilogue (attention_router); one engine launches that router instead."""
    pytest.importorskip("triton")
    model = routed_model(tiny_llama)
    attach_thresholds_(model, "layer", allocation)
    model = model.half().to(DEVICE)
    ef = DecodeEngine(model, 24, use_kernels=True, capture=False)  # router_glue: norms and SiLU·up in the routers
    ea = DecodeEngine(model, 24, use_kernels=True, capture=False, attention_router=False)
    eg = DecodeEngine(model, 24, use_kernels=True, capture=False, router_glue=False)
    er = DecodeEngine(model, 24, use_kernels=True, capture=False, fuse_router=False)
    assert ef.fuse_router and ef.router_glue and eg.fuse_router and not eg.router_glue and not er.fuse_router
    assert ef.attention_router and not ea.attention_router and not eg.attention_router
    given = torch.randint(1, 5, (ef.n_linears,), generator=torch.Generator().manual_seed(3))
    setups = [lambda e: e.set_budget(5.0), lambda e: e.set_budget(3.25), lambda e: e.set_k(3),
              lambda e: e.set_counts(given)]
    seen = set()
    for setup in setups:  # one decode step each, from position 0 on, no prefill (the steps are what differ)
        for e in (ef, ea, eg, er):
            setup(e)
        tok = int(torch.randint(0, 96, (1,)))
        (l1, c1), *rest = [e.decode(tok) for e in (ef, ea, eg, er)]
        assert all(torch.equal(c1, c) and torch.equal(l1, lo) for lo, c in rest)
        seen |= set(c1.tolist())
    assert len(seen) > 2 and int(ef.pos) == len(setups)


def test_fused_router_needs_fp16_and_fused_linears(tiny_llama, routed_model):
    from mobiquant import MoBiQuantError

    pytest.importorskip("triton")
    model = routed_model(tiny_llama).half().to(DEVICE)
    with pytest.raises(MoBiQuantError, match="fuse_router"):
        DecodeEngine(model, 16, use_kernels=True, capture=False, fuse_linears=False, fuse_router=True)
    assert not DecodeEngine(model, 16, use_kernels=True, capture=False, fuse_linears=False).fuse_router
    with pytest.raises(MoBiQuantError, match="router_glue"):
        DecodeEngine(model, 16, use_kernels=True, capture=False, fuse_router=False, router_glue=True)
    with pytest.raises(MoBiQuantError, match="attention_router needs router_glue"):
        DecodeEngine(model, 16, use_kernels=True, capture=False, router_glue=False, attention_router=True)


def _wide_llama(hidden=256):
    """A 2-block LLaMA whose widths (256 or 512, and 512) take groups of 128 and the router's chunks of 256: int8
    activations; at 512, heads of 128 features and 4 groups per input (a split K in the q/k/v launch)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_int8_activations_engine(routed_model):
    """int8_activations: the router launches round x per group and the linears run the int8 path. The counts equal
    the fp16-activation engine's (the routers read x before rounding), the logits are close but not equal (the
    path is in use), at a budget and with given counts."""
    pytest.importorskip("triton")
    model = routed_model(_wide_llama(), group_size=128).half().to(DEVICE)
    e8 = DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True)
    e16 = DecodeEngine(model, 16, use_kernels=True, capture=False)
    assert set(e8.x8) == {256, 512}
    given = torch.randint(1, 5, (e8.n_linears,), generator=torch.Generator().manual_seed(5))
    for setup in (lambda e: e.set_budget(5.0), lambda e: e.set_counts(given)):  # decode steps, no prefill
        for e in (e8, e16):
            setup(e)
        for _ in range(2):
            tok = int(torch.randint(0, 96, (1,)))
            (l8, c8), (l16, c16) = e8.decode(tok), e16.decode(tok)
            assert torch.equal(c8, c16)
            assert torch.isfinite(l8).all() and not torch.equal(l8, l16)
            assert ((l8 - l16).norm() / l16.norm()).item() < 5e-2


def test_norm_fold_engine(routed_model, monkeypatch):
    """norm_fold (int8 activations): where every count is given (set_counts, set_k, budgets 2 and 8), o_proj and
    down_proj compute the next norm and its int8 codes, and no router launch runs for q/k/v past the first block nor
    for gate/up. Against the engine that launches them: the same counts, logits within the codes' rounding (their
    input is w * h in fp32, not the fp16 x), the cache written alike. At a routed budget the step is the same one:
    equal bit for bit (before the folded steps make the caches differ)."""
    import importlib

    from mobiquant import MoBiQuantError

    pytest.importorskip("triton")
    model = routed_model(_wide_llama(512), group_size=128).half().to(DEVICE)
    ef = DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True)
    en = DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True, norm_fold=False)
    assert ef.norm_fold and not en.norm_fold
    rk = importlib.import_module("mobiquant.kernels.router")
    launches = []
    route_partials = rk.route_partials
    monkeypatch.setattr(rk, "route_partials", lambda *a, **kw: launches.append(1) or route_partials(*a, **kw))
    given = torch.randint(1, 5, (ef.n_linears,), generator=torch.Generator().manual_seed(6))
    for mode, setup in (("routed", lambda e: e.set_budget(5.0)), ("counts", lambda e: e.set_counts(given)),
                        ("budget 2", lambda e: e.set_budget(2.0))):  # routed first: the caches then hold the same
        # keys and values (set_k takes the path of set_counts: every count given)
        for e in (ef, en):
            setup(e)
        for _ in range(2 if mode == "routed" else 1):
            tok = int(torch.randint(0, 96, (1,)))
            launches.clear()
            lf, cf = (t.clone() for t in ef.decode(tok))
            n_folded = len(launches)
            ln, cn = en.decode(tok)
            assert torch.isfinite(lf).all() and torch.equal(cf, cn)
            if mode == "routed":
                assert torch.equal(lf, ln) and n_folded == len(launches) - n_folded == 6  # 2 blocks: qkv, gu, down
            else:  # the first block's q/k/v router launch, and each block's down_proj's
                assert n_folded == 3 and len(launches) - n_folded == 6
                assert 0 < ((lf - ln).norm() / ln.norm()).item() < 2e-2
    assert torch.equal(ef.k_cache != 0, en.k_cache != 0)
    with pytest.raises(MoBiQuantError, match="norm_fold needs"):
        DecodeEngine(model, 16, use_kernels=True, capture=False, norm_fold=True)  # fp16 activations
    o = model.model.layers[1].self_attn.o_proj  # a bias after o_proj: its output cannot go straight into h
    o.bias = torch.nn.Parameter(torch.zeros(o.out_features, dtype=torch.float16, device=DEVICE))
    assert not DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True).norm_fold
    with pytest.raises(MoBiQuantError, match="without bias"):
        DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True, norm_fold=True)


def test_rope_in_the_qkv_launch(routed_model, monkeypatch):
    """fuse_rope: the q/k/v launch rotates q and k and writes the cache itself (no rotary launch); counts, logits
    and caches equal the engine that launches the rotary, bit for bit, at a budget (int8 activations here;
    tests/kernels/test_sliced_gemv_cc.py covers fp16 activations too)."""
    import importlib

    from mobiquant import MoBiQuantError

    pytest.importorskip("triton")
    model = routed_model(_wide_llama(512), group_size=128).half().to(DEVICE)
    on = DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True)
    off = DecodeEngine(model, 16, use_kernels=True, capture=False, int8_activations=True, fuse_rope=False)
    assert on.fuse_rope and not off.fuse_rope
    assert on._rope_in_qkv(on.groups[0]["qkv"], on.multi[0].get("qkv"))
    cc = importlib.import_module("mobiquant.kernels.sliced_gemv_cc")
    rope_kv = cc.rope_kv
    calls = []
    monkeypatch.setattr(cc, "rope_kv", lambda *a: calls.append(1) or rope_kv(*a))  # the fallback after the launch
    for e in (on, off):  # decode steps from position 0 (no prefill: the step is what differs)
        e.set_budget(5.0)
    for _ in range(2):
        tok = int(torch.randint(0, 96, (1,)))
        (l1, c1), (l2, c2) = on.decode(tok), off.decode(tok)
        assert torch.isfinite(l1).all()
        assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.equal(on.k_cache, off.k_cache) and torch.equal(on.v_cache, off.v_cache)
    assert len(set(c1.tolist())) > 1 and not calls
    with pytest.raises(MoBiQuantError, match="fuse_rope"):
        DecodeEngine(model, 16, use_kernels=True, capture=False, router_glue=False, fuse_rope=True)


def test_quantized_head(tiny_llama, routed_model):
    """head_slices: lm_head sliced like the linears (MoBiQuantLinear.from_linear, the model's slices and group) and
    run at that fixed count. The dense path's logits equal those of the engine on the model whose lm_head holds
    Ŵ_k; the kernels (the interpreter on the CPU) match them to fp16 rounding, in prefill and in the fused decode
    step; the model itself is not modified (its lm_head stays tied to the embedding); a wrong count is refused."""
    from mobiquant import MoBiQuantConfig, MoBiQuantError
    from mobiquant.nn.linear import MoBiQuantLinear

    pytest.importorskip("triton")
    model = routed_model(tiny_llama).half().to(DEVICE)
    head = model.lm_head
    ids = torch.randint(0, 96, (4,), device=DEVICE)

    def logits(e):  # prefill, then one decode step (kernels: the fused step, add_rms_norm then the head)
        e.set_k(2)  # given counts: the kernels' routers could put a score next to τ on the other side
        return e.prefill(ids)[0].clone(), e.decode(9)[0].clone()

    ed = DecodeEngine(model, 16, use_kernels=False, capture=False, head_slices=3)
    ek = DecodeEngine(model, 16, use_kernels=True, capture=False, head_slices=3)
    assert ek.fuse_glue
    dense, kern, full = logits(ed), logits(ek), logits(DecodeEngine(model, 16, use_kernels=False, capture=False))
    assert model.lm_head is head and head.weight is model.model.embed_tokens.weight
    W3 = MoBiQuantLinear.from_linear(head, MoBiQuantConfig(group_size=32)).weight_k(3).to(torch.float16)
    model.lm_head = torch.nn.Linear(64, 96, bias=False, device=DEVICE, dtype=torch.float16)
    try:
        model.lm_head.weight.data.copy_(W3)
        ref = logits(DecodeEngine(model, 16, use_kernels=False, capture=False))
    finally:
        model.lm_head = head
    for ld, lk, lr, lf in zip(dense, kern, ref, full):
        assert torch.equal(ld, lr)
        torch.testing.assert_close(lk, ld, atol=5e-3 * ld.abs().max().item(), rtol=0)
        assert not torch.equal(ld, lf)  # the head is quantized: not the full-precision logits
        assert ((ld - lf).norm() / lf.norm()).item() < 0.1  # 6 bits: close to them
    for bad in (0, 5, 2.5, True):
        with pytest.raises(MoBiQuantError, match="head_slices"):
            DecodeEngine(model, 16, use_kernels=False, capture=False, head_slices=bad)


def test_int8_activations_need_the_fused_router_and_groups_of_128(tiny_llama, routed_model):
    from mobiquant import MoBiQuantError

    pytest.importorskip("triton")
    wide = routed_model(_wide_llama(), group_size=128).half().to(DEVICE)
    with pytest.raises(MoBiQuantError, match="fused router"):
        DecodeEngine(wide, 16, use_kernels=True, capture=False, fuse_router=False, int8_activations=True)
    narrow = routed_model(tiny_llama).half().to(DEVICE)  # groups of 32, 64 inputs
    with pytest.raises(MoBiQuantError, match="groups of 128"):
        DecodeEngine(narrow, 16, use_kernels=True, capture=False, int8_activations=True)


def test_elastic_generate_engine_options_need_cuda(tiny_llama, routed_model):
    from mobiquant import MoBiQuantError

    model = routed_model(tiny_llama)  # on the CPU
    for kw in (dict(int8_activations=True), dict(head_slices=3)):
        with pytest.raises(MoBiQuantError, match=f"{next(iter(kw))} is an option of the CUDA decode engine"):
            next(elastic_generate(model, WordTokenizer(), "w5 w6", BudgetControl(4.0), max_new_tokens=2, **kw))


@pytest.mark.parametrize("n", [128256, 1000, 257, 96, 5])
def test_greedy_is_the_first_argmax(n):
    """The decode step's two-stage argmax equals torch's (the first maximum), ties and a padded last block too."""
    from mobiquant.engine import greedy

    g = torch.Generator().manual_seed(n)
    for t in range(20):
        v = torch.randn(n, generator=g)
        if t % 2:  # many ties: the first maximum must win
            v = (v * 2).round()
        assert int(greedy(v)) == int(v.argmax())


def test_fused_glue_needs_a_fitting_model(tiny_llama):
    from mobiquant import MoBiQuantError

    with pytest.raises(MoBiQuantError, match="fuse_glue"):
        DecodeEngine(tiny_llama, 16, capture=False, fuse_glue=True)  # fp32 weights
    assert not DecodeEngine(tiny_llama, 16, capture=False).fuse_glue  # CPU default: off


def test_unrouted_model_and_errors(tiny_llama):
    from mobiquant import MoBiQuantConfig, MoBiQuantError, quantize_

    quantize_(tiny_llama, MoBiQuantConfig(group_size=32))
    eng = DecodeEngine(tiny_llama, 32)
    eng.set_budget(6.0)  # a uniform budget: every linear at 3 slices
    _, counts = eng.prefill(torch.tensor([1, 2, 3]))
    assert (counts == 3).all()
    with pytest.raises(MoBiQuantError, match="no router"):
        eng.set_budget(5.0)
    with pytest.raises(MoBiQuantError, match="outside"):
        eng.set_budget(9.0)
    with pytest.raises(MoBiQuantError, match="does not fit"):
        eng.prefill(torch.zeros(40, dtype=torch.long))


def test_fp16_engine_without_quantization(tiny_llama):
    eng = DecodeEngine(tiny_llama, 32)
    ids = torch.randint(0, 96, (1, 6))
    ref, _, _ = hf_step(tiny_llama, ids, None)
    logits, _ = eng.prefill(ids[0])
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert eng.n_linears == 0


def test_supported_rejects_other_models(tiny_llama):
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    assert "model type" in supported(transformers.GPT2LMHeadModel(cfg))
    assert supported(tiny_llama) is None


# ---------------------------------------------------------------------------------------------------- GPU only
def _cuda_model(tiny_llama, routed_model):
    model = routed_model(tiny_llama)
    model.config.eos_token_id = None
    return model.to("cuda", torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graph_matches_eager_and_budget_switch_needs_no_recapture(tiny_llama, routed_model):
    model = _cuda_model(tiny_llama, routed_model)
    eng = DecodeEngine(model, 64)  # captured
    ref = DecodeEngine(model, 64, capture=False)
    assert eng.graph is not None and eng.captures == 1 and eng.use_kernels
    ids = torch.randint(0, 96, (7,), device="cuda")
    for b in (2.0, 3.5, 6.0, 8.0):
        for e in (eng, ref):
            e.set_budget(b)
        eng.prefill(ids)
        ref.prefill(ids)
        for _ in range(4):
            (l1, c1), (l2, c2) = eng.decode(), ref.decode()
            torch.testing.assert_close(l1, l2, atol=1e-3, rtol=1e-3)
            assert torch.equal(c1, c2)
        if b in (2.0, 8.0):
            assert (c1 == (1 if b == 2.0 else 4)).all()
    assert eng.captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int8_activations_graph_matches_eager(routed_model):
    """The int8 engine captured in a CUDA graph (router launches writing the codes, PDL) against itself eagerly, at a
    routed budget and at the forced ones (norm_fold's graph: heads of 128 features, so that it applies)."""
    model = routed_model(_wide_llama(512), group_size=128).to("cuda", torch.float16)
    eng = DecodeEngine(model, 32, int8_activations=True)
    ref = DecodeEngine(model, 32, capture=False, int8_activations=True)
    assert eng.graph is not None and eng.graph_fold is not None and eng.captures == 2  # norm_fold: budgets 2, 8
    ids = torch.randint(0, 96, (5,), device="cuda")
    for b in (2.0, 5.0, 8.0):
        for e in (eng, ref):
            e.set_budget(b)
            e.prefill(ids)
        for _ in range(3):
            (l1, c1), (l2, c2) = eng.decode(), ref.decode()
            assert torch.equal(c1, c2)
            torch.testing.assert_close(l1, l2, atol=1e-3, rtol=1e-3)
    assert eng.captures == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_never_synchronises(tiny_llama, routed_model):
    model = _cuda_model(tiny_llama, routed_model)
    eng = DecodeEngine(model, 64, capture=False)
    eng.set_budget(4.0)
    eng.prefill(torch.randint(0, 96, (5,), device="cuda"))
    eng.decode()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eng.decode()  # the eager step that the graph captures: no host synchronisation anywhere in it
        eng.set_budget(3.0)
        eng.decode()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_elastic_generate_uses_the_engine(tiny_llama, routed_model):
    model = _cuda_model(tiny_llama, routed_model)
    control = BudgetControl(2.0)
    seen = []
    for step in elastic_generate(model, WordTokenizer(), "w5 w6", control, max_new_tokens=8):
        seen.append((step.budget, step.slices.float().mean().item(), step.bits))
        if step.index == 3:
            control.budget = 8.0
    assert model.__dict__["_mobiquant_engine"].captures == 1
    assert [b for b, _, _ in seen] == [2.0] * 4 + [8.0] * 4
    assert all(m == 1.0 and bits == 2.0 for _, m, bits in seen[:4])
    assert all(m == 4.0 and bits == 8.0 for _, m, bits in seen[4:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_elastic_generate_engine_options(routed_model):
    """elastic_generate(int8_activations=True, head_slices=...) builds the engine with the options, and a call
    without them rebuilds the engine without; the steps carry the budget's counts either way."""
    model = routed_model(_wide_llama(), group_size=128).to("cuda", torch.float16)
    for int8, head in ((True, None), (False, 3), (True, 4), (False, None)):
        steps = list(elastic_generate(model, WordTokenizer(), "w5 w6", BudgetControl(2.0), max_new_tokens=4,
                                      int8_activations=int8, head_slices=head))
        eng = model.__dict__["_mobiquant_engine"]
        assert eng.int8_activations is int8 and eng.head_slices == head
        assert len(steps) == 4 and all(s.bits == 2.0 for s in steps)
