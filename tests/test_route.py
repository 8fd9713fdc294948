import pytest
import torch

from mobiquant import MoBiQuantConfig, MoBiQuantError, MoBiQuantLinear, precision
from mobiquant.nn.router import MoBiRoute
from mobiquant.route import ThresholdTable, attach_thresholds_, random_counts
from mobiquant.trace import RoutingTrace


@pytest.mark.parametrize("mode", ["layer", "global"])
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
