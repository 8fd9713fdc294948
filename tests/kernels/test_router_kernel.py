"""The fused decode-time router kernel (kernels/router.py) against the pure-torch reference (mobiquant.ops): fresh
random routers and inputs, irregular K and hidden sizes, nested and band allocations, given counts."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE  # noqa: E402
from mobiquant.kernels.router import route_counts  # noqa: E402

from mobiquant.nn.router import MoBiRoute, nested_counts  # noqa: E402
from mobiquant.ops import route_counts_ref, router_scores  # noqa: E402


def routers(R, H, K, E, seed):
    """R MoBiRoute MLPs (fp16 storage, as calibrated) stacked as the kernel takes them."""
    torch.manual_seed(seed)
    rs = [MoBiRoute(K, E, H) for _ in range(R)]
    for r in rs:
        r.input_scale = torch.rand(K) + 0.5
        r.half()
    s = torch.stack([r.input_scale.float() for r in rs])
    w1 = torch.stack([r.fc1.weight for r in rs])
    b1 = torch.stack([r.fc1.bias for r in rs])
    w2 = torch.stack([r.fc2.weight for r in rs])
    b2 = torch.stack([r.fc2.bias for r in rs])
    return rs, [t.to(DEVICE) for t in (s, w1, b1, w2, b2)]


@pytest.mark.parametrize("R,H,K,E", [(3, 16, 320, 4), (1, 8, 200, 4), (2, 5, 96, 3), (2, 16, 64, 6)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_kernel_matches_mobiroute(R, H, K, E, dtype):
    for seed in range(3):
        rs, (s, w1, b1, w2, b2) = routers(R, H, K, E, seed)
        x = torch.randn(K).to(dtype).to(DEVICE)
        scores = torch.stack([r(x.float().cpu()) for r in rs])  # (R, E-1): MoBiRoute.forward itself
        torch.testing.assert_close(router_scores(x[None], s, w1, b1, w2, b2)[0].cpu(), scores, atol=1e-5, rtol=1e-5)
        tau = scores[:, 0] + torch.tensor([-1e-2, 1e-2] * R)[:R]  # thresholds near the scores: both sides tested
        off = torch.zeros(E - 1, dtype=torch.bool, device=DEVICE)
        given = torch.zeros(R, dtype=torch.bool, device=DEVICE)
        cin = torch.ones(R, dtype=torch.int32, device=DEVICE)
        out = route_counts(x, s, w1, b1, w2, b2, tau.to(DEVICE), off, off, given, cin)
        expect = torch.stack([nested_counts(scores[r], tau[r]) for r in range(R)]).int()
        assert torch.equal(out.cpu(), expect)


def test_band_forcing_and_given_counts():
    R, E = 3, 4
    for seed in range(4):
        _, (s, w1, b1, w2, b2) = routers(R, 16, 256, E, seed)
        x = torch.randn(256).half().to(DEVICE)
        g = torch.Generator().manual_seed(seed)
        tau = torch.randn(R, generator=g).to(DEVICE)
        for band in range(E):  # column c forced on below the band, off above (route.band_scores)
            on = torch.tensor([c < band - 1 for c in range(E - 1)], device=DEVICE)
            off = torch.tensor([c > band - 1 for c in range(E - 1)], device=DEVICE)
            given = torch.rand(R, generator=g).to(DEVICE) < 0.4
            cin = torch.randint(1, E + 1, (R,), generator=g, dtype=torch.int32).to(DEVICE)
            args = (x, s, w1, b1, w2, b2, tau, on, off, given, cin)
            out = route_counts(*args)
            assert torch.equal(out, route_counts_ref(*args))
            free = ~given.cpu()
            assert ((out.cpu()[free] >= max(band, 1)) & (out.cpu()[free] <= band + 1)).all()
