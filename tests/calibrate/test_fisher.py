"""Cost curves (calibrate/fisher.py) and the fisher allocation that spends a budget by them (route.py)."""

import pytest
import torch
import torch.nn.functional as F

import mobiquant
from mobiquant import MoBiQuantError, precision
from mobiquant.calibrate.fisher import FRACTIONS, cost_curve, fit_fisher_
from mobiquant.route import _lower_hull, attach_thresholds_, fisher_allocation
from mobiquant.trace import RoutingTrace


def test_lower_hull_drops_points_above_the_chord():
    pts = [(2.0, 10.0), (3.0, 9.0), (4.0, 2.0), (5.0, 1.5), (6.0, 0.0)]
    assert _lower_hull(pts) == [(2.0, 10.0), (4.0, 2.0), (6.0, 0.0)]


def test_fisher_allocation_meets_the_budget_and_gives_bits_where_they_lower_the_cost():
    precisions = [2.0, 4.0, 6.0, 8.0]
    curve = lambda scale: (precisions, [scale * c for c in (64.0, 16.0, 4.0, 0.0)])  # noqa: E731
    curves = {"sensitive": curve(100.0), "robust": curve(1.0), "big": curve(10.0)}
    sizes = {"sensitive": 1000, "robust": 1000, "big": 3000}
    total = sum(sizes.values())
    for bits in (2.0, 3.0, 4.0, 5.5, 8.0):
        out = fisher_allocation(curves, sizes, bits)
        assert sum(out[n] * sizes[n] for n in out) / total == pytest.approx(bits, abs=1e-9)
        assert all(2.0 - 1e-9 <= b <= 8.0 + 1e-9 for b in out.values())
        if 2.0 < bits < 8.0:
            assert out["sensitive"] >= out["big"] >= out["robust"]
            assert out["sensitive"] > out["robust"]


def test_cost_curve_prices_the_routers_ranking():
    """c(k) from the tail sums of the slice shares; the router's top fraction of tokens at k+1 buys the most."""
    T, precisions = 400, [3, 4, 5]
    u = torch.randn(T, 2)
    scores = torch.randn(T, 2)
    bits, cost = cost_curve(u, scores, precisions)
    assert bits.tolist() == sorted(bits.tolist()) and len(bits) == 3 + 2 * len(FRACTIONS)
    c = dict(zip(bits.tolist(), cost.tolist()))
    assert c[5.0] == 0.0
    assert c[3.0] == pytest.approx(float(((u[:, 0] + u[:, 1]) ** 2).mean()), rel=1e-5)
    assert c[4.0] == pytest.approx(float((u[:, 1] ** 2).mean()), rel=1e-5)
    oracle = ((u[:, 0] + u[:, 1]) ** 2 - u[:, 1] ** 2)  # what slice 2 saves each token
    _, good = cost_curve(u, torch.stack([oracle, scores[:, 1]], -1), precisions)
    _, bad = cost_curve(u, torch.stack([-oracle, scores[:, 1]], -1), precisions)
    assert good[1] < c[3.25] < bad[1]  # 3.25 bits: a router that ranks by the saving beats one that ranks against it


def test_fit_fisher_matches_the_gradient_at_each_linear(tiny_llama, routed_model):
    routed_model(tiny_llama)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    fit_fisher_(tiny_llama, ids, batch_size=2, progress=False)
    linears = mobiquant.quantized_linears(tiny_llama)
    name, m = next(iter(linears.items()))
    E = m.num_slices
    # the same quantity by hand: g = dL/dy at this linear, with every slice on
    store = {}

    def keep(mod, args, out):
        out.retain_grad()
        store.update(x=args[0].detach(), y=out)

    h = m.register_forward_hook(keep)
    with torch.enable_grad(), precision(k=E):
        x = tiny_llama.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = tiny_llama(inputs_embeds=x).logits[:, :-1].float()
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    h.remove()
    X, G = store["x"].reshape(-1, m.in_features), store["y"].grad.reshape(-1, m.out_features)
    expect = ((G @ (m.weight_k(1) - m.weight_k(E)) * X).sum(-1) ** 2).mean()
    curve = dict(zip(m.router.fisher_bits.tolist(), m.router.fisher_cost.tolist()))
    assert curve[float(m.precisions[0])] == pytest.approx(float(expect), rel=1e-3)
    assert curve[float(m.precisions[-1])] == 0.0
    assert all(r.router.fisher_cost.numel() == E + (E - 1) * len(FRACTIONS) for r in linears.values())


def test_fisher_allocation_realizes_the_budget_with_unequal_linears_and_decodes_like_a_prefill(tiny_llama,
                                                                                                 routed_model):
    routed_model(tiny_llama)
    fit_fisher_(tiny_llama, torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(4)),
                progress=False)
    table = attach_thresholds_(tiny_llama, "balanced", "fisher")
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    for budget in (4.0, 5.0):
        tr = RoutingTrace()
        with torch.no_grad(), precision(budget=budget, trace=tr):
            tiny_llama(input_ids=ids)
        assert abs(tr.realized_bits() - budget) < 0.1
        per_linear = {n: torch.cat(c).float().mean().item() for n, c in tr.counts.items()}
        assert max(per_linear.values()) > min(per_linear.values())  # an integer budget, not one uniform precision
        assert {table.band(n, budget)[:2] for n in table.linears} != {(2, 2)}
    full = RoutingTrace()
    with torch.no_grad(), precision(budget=4.5, trace=full):
        tiny_llama(input_ids=ids[:, :12])
    cache = None
    for t in range(12):
        tr = RoutingTrace()
        with torch.no_grad(), precision(budget=4.5, trace=tr):
            cache = tiny_llama(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values
        assert {n: int(c[0][0]) for n, c in tr.counts.items()} == {n: int(c[0][t]) for n, c in full.counts.items()}


def test_fisher_allocation_needs_cost_curves_and_balanced_thresholds(tiny_llama, routed_model):
    routed_model(tiny_llama)
    with pytest.raises(MoBiQuantError, match="cost curve"):
        attach_thresholds_(tiny_llama, "balanced", "fisher")
    fit_fisher_(tiny_llama, torch.randint(0, 96, (2, 16)), progress=False)
    with pytest.raises(MoBiQuantError, match="balanced"):
        attach_thresholds_(tiny_llama, "layer", "fisher")
    with pytest.raises(MoBiQuantError, match="balanced"):
        mobiquant.MoBiQuantConfig(thresholds="layer", allocation="fisher")
    with pytest.raises(MoBiQuantError, match="tokens"):
        fit_fisher_(tiny_llama, torch.randint(0, 96, (16,)), progress=False)
