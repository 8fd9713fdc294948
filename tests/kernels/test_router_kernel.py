"""The fused decode-time router kernel (kernels/router.py) against the pure-torch reference (mobiquant.ops): fresh
random routers and inputs, irregular K and hidden sizes, nested and band allocations, given counts, K split over
1..13 programs per router (uneven last chunk, non-power-of-two split counts)."""

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


@pytest.mark.parametrize("R,H,K,E", [(3, 16, 320, 4), (1, 8, 200, 4), (2, 5, 96, 3), (2, 16, 64, 6),
                                     (2, 16, 1000, 4), (1, 8, 2500, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# the default (router.default_chunk: 256 for these K), 2..32 programs per router, one per router (one tile of up to
# 1024 in-features; at K = 2500 a loop over tiles of 256)
@pytest.mark.parametrize("chunk_k", [None, 80, 1 << 20])
def test_router_kernel_matches_mobiroute(R, H, K, E, dtype, chunk_k):
    for seed in range(3):
        rs, (s, w1, b1, w2, b2) = routers(R, H, K, E, seed)
        x = torch.randn(K).to(dtype).to(DEVICE)
        scores = torch.stack([r(x.float().cpu()) for r in rs])  # (R, E-1): MoBiRoute.forward itself
        torch.testing.assert_close(router_scores(x[None], s, w1, b1, w2, b2)[0].cpu(), scores, atol=1e-5, rtol=1e-5)
        tau = scores[:, 0] + torch.tensor([-1e-2, 1e-2] * R)[:R]  # thresholds near the scores: both sides tested
        off = torch.zeros(E - 1, dtype=torch.bool, device=DEVICE)
        given = torch.zeros(R, dtype=torch.bool, device=DEVICE)
        cin = torch.ones(R, dtype=torch.int32, device=DEVICE)
        out = route_counts(x, s, w1, b1, w2, b2, tau.to(DEVICE), off, off, given, cin, chunk_k=chunk_k)
        expect = torch.stack([nested_counts(scores[r], tau[r]) for r in range(R)]).int()
        assert torch.equal(out.cpu(), expect)


def test_default_chunk():
    """The widest power of two from 256 to CHUNK_K that divides K (whole int8 groups per program), else 256; a
    CHUNK_K past one tile as it is."""
    from mobiquant.kernels import router as rk

    assert rk.CHUNK_K == rk.MAX_TILE_K == 1024
    got = {K: rk.default_chunk(K) for K in (4096, 14336, 1536, 2048, 768, 576, 320, 96)}
    assert got == {4096: 1024, 14336: 1024, 1536: 512, 2048: 1024, 768: 256, 576: 256, 320: 256, 96: 256}
    shipped = rk.CHUNK_K
    try:
        rk.CHUNK_K = 1 << 20
        assert rk.default_chunk(14336) == 1 << 20
    finally:
        rk.CHUNK_K = shipped


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


@pytest.mark.parametrize("chunk_k", [None, 48])
def test_split_router_equals_reference_on_fresh_inputs(chunk_k):
    """Irregular shapes, some routers given, fp32 weights (as the engine stacks them); counts equal the reference
    and the split counters are left at zero (the next launch starts clean)."""
    from mobiquant.kernels import router as rk

    g = torch.Generator().manual_seed(int(chunk_k or 0) + 17)
    for R, H, K, E in [(3, 16, 712, 4), (1, 7, 1000, 3), (2, 16, 4096, 4)]:
        s = (torch.rand(R, K, generator=g) + 0.5).to(DEVICE)
        w1 = (torch.randn(R, H, K, generator=g) * K ** -0.5).to(DEVICE)
        b1 = (torch.randn(R, H, generator=g) * 0.1).to(DEVICE)
        w2 = (torch.randn(R, E - 1, H, generator=g) * H ** -0.5).to(DEVICE)
        b2 = torch.zeros(R, E - 1).to(DEVICE)
        x = torch.randn(K, generator=g).half().to(DEVICE)
        tau = (router_scores(x[None], s, w1, b1, w2, b2)[0, :, 0] + 1e-2).to(DEVICE)
        tau[0] -= 2e-2  # one router just below its score, the others just above
        off = torch.zeros(E - 1, dtype=torch.bool, device=DEVICE)
        given = (torch.arange(R) == R - 1).to(DEVICE) if R > 1 else torch.zeros(1, dtype=torch.bool, device=DEVICE)
        cin = torch.randint(1, E + 1, (R,), generator=g, dtype=torch.int32).to(DEVICE)
        args = (x, s, w1, b1, w2, b2, tau, off, off, given, cin)
        y = torch.full((R,), -7, dtype=torch.int32, device=DEVICE)  # every count must be written
        route_counts(*args, out=y, chunk_k=chunk_k)
        assert torch.equal(y, route_counts_ref(*args))
        assert int(rk._SCRATCH[(x.device.type, x.device.index)][1][:R].abs().sum()) == 0
