import pytest
import torch

from mobiquant import MoBiQuantConfig, MoBiQuantError, MoBiQuantLinear, precision
from mobiquant.nn.router import MoBiRoute
from mobiquant.route import ThresholdTable, attach_thresholds_, random_counts
from mobiquant.trace import RoutingTrace


@pytest.mark.parametrize("mode", ["layer", "global", "adaptive"])
def test_budget_realized_on_held_out_tokens(tiny_llama, routed_model, mode):
    routed_model(tiny_llama)
    attach_thresholds_(tiny_llama, mode)
    ids = torch.randint(0, 96, (4, 64))
    previous = None
    for b in (2.0, 3.0, 4.5, 6.0, 8.0):
        tr = RoutingTrace(keep=False)
        with torch.no_grad(), precision(budget=b, trace=tr):
            tiny_llama(input_ids=ids)
        assert abs(tr.realized_bits() - b) < 0.1
        if previous is not None:
            assert tr.realized_bits() >= previous
        previous = tr.realized_bits()


def test_trace_matrix_and_names(tiny_llama, routed_model):
    routed_model(tiny_llama)
    tr = RoutingTrace()
    with torch.no_grad(), precision(budget=5.0, trace=tr):
        tiny_llama(input_ids=torch.randint(0, 96, (1, 9)))
    mat, names = tr.matrix()
    assert mat.shape == (2, 7) and names[0] == "self_attn.q_proj" and names[-1] == "mlp.down_proj"
    assert mat.min() >= 1 and mat.max() <= 4


def test_random_mode_hits_the_budget_in_expectation():
    n = random_counts(torch.Size([20000]), (2, 2, 2, 2), 3.0, torch.Generator().manual_seed(0))
    assert set(n.unique().tolist()) == {1, 2}
    B = torch.tensor([0, 2, 4, 6, 8.0])
    assert abs(B[n].mean().item() - 3.0) < 0.05
    assert torch.equal(random_counts(torch.Size([5]), (2, 2, 2, 2), 6.0, None), torch.full((5,), 3))


def test_bad_budgets(tiny_llama, routed_model):
    routed_model(tiny_llama)
    ids = torch.randint(0, 96, (1, 4))
    for bad in (float("nan"), -1.0, 0.0, float("inf")):
        with pytest.raises(MoBiQuantError, match="positive finite"):
            with precision(budget=bad):
                pass
    for bad in (1.5, 8.5, 100.0):
        with pytest.raises(MoBiQuantError, match="outside this model's range"):
            with torch.no_grad(), precision(budget=bad):
                tiny_llama(input_ids=ids)
    with pytest.raises(MoBiQuantError, match="number"):
        with precision(budget="4"):
            pass


def test_uncalibrated_layer_only_takes_uniform_budgets():
    q = MoBiQuantLinear.from_linear(torch.nn.Linear(64, 8), MoBiQuantConfig(group_size=32))
    x = torch.randn(3, 64)
    with precision(budget=4.0):
        torch.testing.assert_close(q(x), q(x, k=2))
    with pytest.raises(MoBiQuantError, match="no router"):
        with precision(budget=3.0):
            q(x)


def test_threshold_table_requires_scores():
    q = MoBiQuantLinear.from_linear(torch.nn.Linear(64, 8), MoBiQuantConfig(group_size=32))
    q.router = MoBiRoute(64, 4)
    with pytest.raises(MoBiQuantError, match="no calibration scores"):
        ThresholdTable({"x": q})


def test_adaptive_thresholds_follow_a_shifted_text():
    """Scores on the user's text sit higher than on the calibration text: fixed thresholds overshoot the budget,
    the adaptive mode (causal chunks) tracks it."""
    from mobiquant.nn.router import realized_bits

    q = MoBiQuantLinear.from_linear(torch.nn.Linear(64, 8), MoBiQuantConfig(group_size=32))
    q.name, q.router = "lin", MoBiRoute(64, 4)
    q.router.set_calibration_scores_(torch.randn(512, 3))
    shifted = torch.randn(1, 1500, 3) + 1.0
    fixed = ThresholdTable({"lin": q}, "layer")
    adaptive = ThresholdTable({"lin": q}, "adaptive")
    for b in (3.0, 5.0):
        n_fixed = torch.cumprod((shifted > fixed.tau("lin", b)).long(), -1).sum(-1) + 1
        n_adapt = adaptive.counts("lin", shifted[:, :1024], b, None)
        assert abs(float(realized_bits(n_fixed, q.slice_bits)) - b) > 0.5
        assert abs(float(realized_bits(n_adapt[:, 256:], q.slice_bits)) - b) < 0.15  # once the text has 256 tokens
    # a stream carries its history across calls (decode steps of one token)
    stream = {}
    counts = [adaptive.counts("lin", shifted[:, t : t + 1], 4.0, stream) for t in range(1500)]
    assert stream[("lin",)].shape == (1500, 3)
    # 1200 tokens of about 2.2 bits standard deviation each: the mean is known to about ±0.07
    assert abs(float(realized_bits(torch.cat(counts[300:], 1), q.slice_bits)) - 4.0) < 0.2


@pytest.mark.parametrize("mode", ["layer", "global", "adaptive"])
def test_band_allocation_uses_the_two_precisions_around_the_budget(tiny_llama, routed_model, mode):
    routed_model(tiny_llama)
    attach_thresholds_(tiny_llama, mode, "band")
    ids = torch.randint(0, 96, (4, 64))
    for b, allowed in ((3.0, {1, 2}), (5.5, {2, 3}), (6.0, {2, 3})):  # B_k = 2, 4, 6, 8
        tr = RoutingTrace(keep=True)
        with torch.no_grad(), precision(budget=b, trace=tr):
            tiny_llama(input_ids=ids)
        used = set(torch.cat([c for calls in tr.counts.values() for c in calls]).unique().tolist())
        assert used <= allowed, (b, used)
        assert abs(tr.realized_bits() - b) < 0.15


@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_band_fast_path_equals_nested_counts_of_band_scores(slice_bits):
    """The layer-mode band shortcut gives exactly nested_counts(band_scores(s), τ) at every budget."""
    from mobiquant.nn.router import nested_counts
    from mobiquant.route import band_scores

    class L:  # the attributes ThresholdTable reads
        def __init__(self):
            self.slice_bits, self.in_features, self.out_features = slice_bits, 8, 8
            self.router = type("R", (), {"calib_scores": torch.randn(300, len(slice_bits) - 1),
                                         "threshold": lambda self, b: None})()

    table = ThresholdTable({"a": L()}, "layer", "band")
    scores = torch.randn(4, 50, len(slice_bits) - 1)
    B = list(torch.tensor(slice_bits).cumsum(0).tolist())
    for bits in [B[0], B[0] + 0.3, (B[0] + B[1]) / 2, B[1], B[-1] - 0.25, B[-1]]:
        fast = table.counts("a", scores, bits)
        slow = nested_counts(band_scores(scores, slice_bits, bits), table.tau("a", bits))
        assert torch.equal(fast, slow), bits
        assert fast.min() >= 1 and fast.max() <= len(slice_bits)


@pytest.mark.parametrize("allocation", ["nested", "band"])
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_count_token_equals_counts(allocation, slice_bits):
    """The CPU decode shortcut (one token's scores as floats) gives the count ``counts`` gives, at every budget."""

    class L:
        def __init__(self):
            self.slice_bits, self.in_features, self.out_features = slice_bits, 8, 8
            self.router = type("R", (), {"calib_scores": torch.randn(300, len(slice_bits) - 1),
                                         "threshold": lambda self, b: None})()

    table = ThresholdTable({"a": L()}, "layer", allocation)
    scores = torch.randn(200, len(slice_bits) - 1)
    scores[0] = float("nan")  # a NaN score turns nothing on, in both
    B = list(torch.tensor(slice_bits).cumsum(0).tolist())
    for bits in [B[0], B[0] + 0.3, (B[0] + B[1]) / 2, B[1], B[-1] - 0.25, B[-1]]:
        full = table.counts("a", scores, bits)
        one = [table.count_token("a", s.tolist(), bits) for s in scores]
        assert one == full.tolist(), bits


@pytest.mark.parametrize("allocation,mode", [("nested", "layer"), ("nested", "global"), ("nested", "adaptive"),
                                             ("band", "layer"), ("band", "balanced")])
def test_extreme_budgets_force_every_count(tiny_llama, routed_model, allocation, mode, monkeypatch):
    """At B_1 every token takes 1 slice and at B_E all E, whatever its scores (τ fitted on calibration text would let
    a token whose scores exceed every calibration score over the budget); between them the scores decide. The
    model's forward at those budgets runs no router MLP."""
    model = routed_model(tiny_llama)
    attach_thresholds_(model, mode, allocation)
    m = next(mod for mod in model.modules() if isinstance(mod, MoBiQuantLinear))
    table, B, E = m.thresholds, m.precisions, m.num_slices
    high = torch.full((7, E - 1), 1e6)  # far above every calibration score: on at any finite τ
    for scores, bits, k in ((high, B[0], 1), (-high, B[-1], E)):
        assert (table.counts(m.name, scores, bits, stream={}, tally={}) == k).all()
        if mode != "adaptive":
            assert all(table.count_token(m.name, s.tolist(), bits, tally={}) == k for s in scores)
    mid = (B[0] + B[-1]) / 2
    assert table.counts(m.name, high, mid, stream={}, tally={}).max() > 1  # not forced between the extremes
    def no_router(*a, **k):
        raise AssertionError("a router ran at an extreme budget")

    for lin in (mod for mod in model.modules() if isinstance(mod, MoBiQuantLinear)):
        monkeypatch.setattr(lin.router, "forward", no_router)
        monkeypatch.setattr(lin.router, "_inference_weights", no_router)
    for T, bits in ((5, B[0]), (1, B[-1])):  # route() on 5 tokens, the one-token decode shortcut on 1
        tr = RoutingTrace()
        with torch.no_grad(), precision(trace=tr, budget=bits):
            model(inputs_embeds=torch.randn(1, T, tiny_llama.config.hidden_size))
        assert tr.realized_bits() == pytest.approx(bits)


def test_one_token_decode_path_matches_the_batched_path(tiny_llama, routed_model):
    """Token by token (the int fast path in route and trace) and all tokens at once give the same counts, bits and
    logits at a routed budget."""
    routed_model(tiny_llama)
    attach_thresholds_(tiny_llama, "layer", "band")
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        full_tr = RoutingTrace()
        with precision(budget=4.5, trace=full_tr):
            full = tiny_llama(input_ids=ids).logits
        cache, logits, bits = None, [], []
        for t in range(ids.shape[1]):
            tr = RoutingTrace()
            with precision(budget=4.5, trace=tr):
                out = tiny_llama(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
            mat, _ = tr.matrix()
            full_mat, _ = full_tr.matrix()
            counts = {n: int(c[0][0]) for n, c in tr.counts.items()}
            assert counts == {n: int(c[0][t]) for n, c in full_tr.counts.items()}
            assert mat.min() >= 1
            bits.append(tr.realized_bits())
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
    assert abs(sum(bits) / len(bits) - full_tr.realized_bits()) < 1e-9


def test_balanced_mode_hits_the_budget_and_spreads_the_extra_slice_over_tokens(tiny_llama, routed_model):
    """Balanced thresholds realize the budget, keep every token near it (the per-layer thresholds let the same
    tokens take the higher precision everywhere), and decide one token at a time exactly as all at once."""
    routed_model(tiny_llama)
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    spread = {}
    for mode in ("layer", "balanced"):
        attach_thresholds_(tiny_llama, mode, "band")
        tr = RoutingTrace()
        with torch.no_grad(), precision(budget=4.5, trace=tr):
            tiny_llama(input_ids=ids)
        assert abs(tr.realized_bits() - 4.5) < 0.1
        hi = torch.stack([torch.cat(c) for c in tr.counts.values()]) == 3  # (linears, tokens): at 6 bits
        assert set(torch.stack([torch.cat(c) for c in tr.counts.values()]).unique().tolist()) <= {2, 3}
        spread[mode] = hi.float().mean(0)  # per token: the fraction of linears at the higher precision
    assert spread["layer"].min() == 0  # the per-layer thresholds starve some tokens in every linear ...
    assert spread["balanced"].min() > 0  # ... the balanced ones do not
    assert spread["balanced"].std() < 0.75 * spread["layer"].std()
    with pytest.raises(MoBiQuantError, match="band"):
        attach_thresholds_(tiny_llama, "balanced", "nested")


def test_balanced_decode_matches_the_batched_forward(tiny_llama, routed_model):
    routed_model(tiny_llama)
    attach_thresholds_(tiny_llama, "balanced", "band")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full_tr = RoutingTrace()
        with precision(budget=3.25, trace=full_tr):
            tiny_llama(input_ids=ids)
        cache = None
        for t in range(ids.shape[1]):
            tr = RoutingTrace()
            with precision(budget=3.25, trace=tr):
                cache = tiny_llama(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values
            assert {n: int(c[0][0]) for n, c in tr.counts.items()} == {n: int(c[0][t]) for n, c in
                                                                        full_tr.counts.items()}
