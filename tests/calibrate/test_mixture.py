import pytest
import torch

from mobiquant.calibrate.mixture import routed_mixture
from mobiquant.nn.router import ste_nested_mask, threshold_for_bits


def plain_mixture(x, m, W):
    """The definition: Ŵ_1 x + Σ_e m_e ΔŴ_e x, one matmul per slice (autograd does the backward)."""
    y = x @ W[0].T
    for e in range(1, len(W)):
        y = y + m[..., e - 1 : e] * (x @ (W[e] - W[e - 1]).T)
    return y


@pytest.mark.parametrize("E", [2, 4, 6])
def test_routed_mixture_matches_the_plain_sum_values_and_gradients(E):
    g = torch.Generator().manual_seed(E)
    M, K, N = 37, 24, 19
    x0 = torch.randn(2, M, K, generator=g, dtype=torch.float64)
    W0 = [torch.randn(N, K, generator=g, dtype=torch.float64) for _ in range(E)]
    s0 = torch.randn(2, M, E - 1, generator=g, dtype=torch.float64)
    tau = threshold_for_bits(s0, [2] * E, E + 1.3)
    up = torch.randn(2, M, N, generator=g, dtype=torch.float64)  # a fresh upstream gradient
    grads, outs = [], []
    for fn in (plain_mixture, routed_mixture):
        x = x0.clone().requires_grad_()
        s = s0.clone().requires_grad_()
        W = [w.clone().requires_grad_() for w in W0]
        m = ste_nested_mask(s, tau, 0.7)
        y = fn(x, m, W)
        (y * up).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad, s.grad, *[w.grad for w in W]])
    counts = 1 + (m.detach().sum(-1))
    assert counts.min() < counts.max()  # the tokens really use different slice counts
    torch.testing.assert_close(outs[1], outs[0])
    for got, want in zip(grads[1], grads[0]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


def test_routed_mixture_without_gradients_and_with_an_empty_level():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=g)
    W = [torch.randn(5, 8, generator=g) for _ in range(3)]
    m = torch.zeros(9, 2)
    m[:4, 0] = 1  # counts 1 and 2 only: level 3 is empty
    with torch.no_grad():
        torch.testing.assert_close(routed_mixture(x, m, W), plain_mixture(x, m, W))
    W = [w.requires_grad_() for w in W]
    routed_mixture(x, m, W).sum().backward()
    assert W[2].grad is not None and torch.equal(W[2].grad, torch.zeros_like(W[2]))  # the empty level: zero
    assert W[1].grad.abs().max() > 0
