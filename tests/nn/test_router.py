import pytest
import torch

from mobiquant.nn.router import MoBiRoute, nested_counts, realized_bits, ste_nested_mask, threshold_for_bits


def test_masks_are_nested_and_first_slice_always_on():
    scores = torch.randn(500, 3)
    for tau in (-1.0, 0.0, 0.7):
        m = ste_nested_mask(scores, tau).detach()  # (T, E-1) residual slices 2..E
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert (m[:, 1:] <= m[:, :-1]).all()  # slice e only if slice e-1
        n = nested_counts(scores, tau)
        assert torch.equal(n, 1 + m.sum(-1).long()) and n.min() >= 1 and n.max() <= 4


def test_straight_through_gradients_flow():
    scores = torch.randn(64, 3, requires_grad=True)
    m = ste_nested_mask(scores, 0.1)
    (m * torch.randn(64, 3)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert torch.equal(m.detach(), torch.cumprod((scores > 0.1).float(), -1))  # forward is the hard mask


def test_router_gradient_reaches_mlp_weights():
    r = MoBiRoute(32, 4, hidden=8)
    x = torch.randn(10, 32)
    m = ste_nested_mask(r(x), 0.0)
    (m.sum(-1) ** 2).mean().backward()
    assert r.fc1.weight.grad.abs().sum() > 0 and r.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("slice_bits, target", [
    *[((2, 2, 2, 2), t) for t in (2.5, 3.0, 4.25, 5.0, 6.9)],
    *[((3, 1, 1, 1, 1, 1), t) for t in (3.0, 4.25, 5.0, 6.9)],
])
def test_budget_to_threshold_hits_target_on_random_data(slice_bits, target):
    scores = torch.randn(4000, len(slice_bits) - 1) * 3 + torch.randn(4000, 1)
    tau = threshold_for_bits(scores, slice_bits, target)
    assert abs(float(realized_bits(nested_counts(scores, tau), slice_bits)) - target) < 0.01
    held_out = torch.randn(4000, len(slice_bits) - 1) * 3 + torch.randn(4000, 1)  # same distribution
    assert abs(float(realized_bits(nested_counts(held_out, tau), slice_bits)) - target) < 0.1


def test_higher_threshold_never_adds_bits():
    scores = torch.randn(300, 3)
    bits = [float(realized_bits(nested_counts(scores, t), (2, 2, 2, 2))) for t in torch.linspace(-3, 3, 25)]
    assert all(b <= a for a, b in zip(bits, bits[1:]))


def test_calibration_scores_are_sampled_and_kept():
    r = MoBiRoute(16, 4)
    r.set_calibration_scores_(torch.randn(5000, 3), keep=1000)
    assert r.calib_scores.shape == (1000, 3)
