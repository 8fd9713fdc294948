"""Exact identities of MoBiSlice (paper-notes §4.4) on fresh random weights."""

import pytest
import torch

from mobiquant.quant import slices

SLICE_LISTS = [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (4, 4), (1, 2, 3)]


def weights(N=48, K=192, scale=0.05):
    W = torch.randn(N, K) * scale
    W[0, :5] = torch.tensor([0.9, -0.7, 0.3, 0.0, 0.0])  # an outlier group, exercising the range
    W[1, :64] = 0.01  # a constant group: the scale floor
    return W


def direct_floor_quantizer(W, s_1, z_1, slice_bits, k, g):
    """The B_k-bit mid-rise floor quantizer on the same range, written independently of slices.py."""
    B_k = sum(slice_bits[:k])
    s_k = s_1 / 2 ** (B_k - slice_bits[0])  # (N, G)
    lo = -z_1 * s_1  # range start
    Wg = W.reshape(W.shape[0], -1, g)
    q = torch.floor((Wg - lo[..., None]) / s_k[..., None])
    q = q.clamp(0, 2**B_k - 1)
    return (lo[..., None] + s_k[..., None] * (q + 0.5)).reshape(W.shape)


@pytest.mark.parametrize("slice_bits", SLICE_LISTS)
@pytest.mark.parametrize("g", [32, 64])
def test_first_k_slices_equal_a_floor_quantizer(slice_bits, g):
    W = weights()
    codes, s_1, z_1 = slices.decompose(W, g, slice_bits)
    for k in range(1, len(slice_bits) + 1):
        W_k = slices.reconstruct(codes[:k], s_1, z_1, slice_bits)
        ref = direct_floor_quantizer(W.double(), s_1.double(), z_1.double(), slice_bits, k, g)
        # same value up to the fp32 rounding of the two formulas (s_k (Q - Z) vs lo + s_k (q + 1/2))
        torch.testing.assert_close(W_k.double(), ref, rtol=0, atol=4e-7 * W.abs().max().item())
        # and the integer codes are exactly the floor quantizer's codes
        Q_k = slices.combine(codes[:k], slice_bits)
        B_k = sum(slice_bits[:k])
        u = (W.double().reshape(W.shape[0], -1, g) / s_1.double()[..., None] + z_1.double()[..., None])
        q = torch.floor(u * 2.0 ** (B_k - slice_bits[0])).clamp(0, 2**B_k - 1).reshape(W.shape)
        assert torch.equal(Q_k.double(), q)


@pytest.mark.parametrize("slice_bits", SLICE_LISTS)
def test_dropping_slices_truncates_codes(slice_bits):
    W = weights()
    codes, _, _ = slices.decompose(W, 64, slice_bits)
    for k in range(1, len(slice_bits)):
        Q_k = slices.combine(codes[:k], slice_bits)
        Q_next = slices.combine(codes[: k + 1], slice_bits)
        assert torch.equal(Q_k, Q_next >> slice_bits[k])


def test_recursive_residual_definition_gives_the_same_codes():
    """Paper App. B: slice e quantizes W - Ŵ_{e-1} with step s_e and the midpoint zero point 2^(b_e - 1)."""
    slice_bits, g = (2, 2, 2, 2), 64
    W = weights().double()
    codes, s_1, z_1 = slices.decompose(W.float(), g, slice_bits)
    s_1, z_1 = s_1.double(), z_1.double()
    N = W.shape[0]
    Wg = W.reshape(N, -1, g)
    lo = (-z_1 * s_1)[..., None]
    c1 = torch.floor((Wg - lo) / s_1[..., None]).clamp(0, 3)
    W_hat = lo + s_1[..., None] * (c1 + 0.5)
    rec = [c1]
    s_e = s_1[..., None]
    for b in slice_bits[1:]:
        s_e = s_e / 2**b
        c = torch.floor((Wg - W_hat) / s_e + 2 ** (b - 1)).clamp(0, 2**b - 1)
        W_hat = W_hat + s_e * (c - (2**b - 1) / 2)
        rec.append(c)
    for e, (c, r) in enumerate(zip(codes, rec), start=1):
        assert torch.equal(c.double(), r.reshape(W.shape)), f"slice {e}"


def test_residual_corrections_are_bounded_and_signed():
    """Ŵ_{k+1} - Ŵ_k in {±1/8, ±3/8} s_k for 2-bit residual slices, and ΔŴ_e matches it."""
    slice_bits = (2, 2, 2, 2)
    W = torch.randn(32, 128) * 0.02
    codes, s_1, z_1 = slices.decompose(W, 64, slice_bits)
    for k in range(1, 4):
        d = slices.reconstruct(codes[: k + 1], s_1, z_1, slice_bits) - slices.reconstruct(codes[:k], s_1, z_1,
                                                                                           slice_bits)
        s_k = (s_1 / 4 ** (k - 1)).repeat_interleave(64, dim=1)
        ratio = (d / s_k).double()
        allowed = torch.tensor([-3 / 8, -1 / 8, 1 / 8, 3 / 8], dtype=torch.double)
        assert torch.isclose(ratio[..., None], allowed, atol=1e-5).any(-1).all()
        torch.testing.assert_close(slices.slice_delta(codes[k], s_1, z_1, slice_bits, k + 1), d, rtol=0, atol=1e-7)


def test_slice_deltas_sum_to_the_reconstruction():
    slice_bits = (3, 1, 1, 1, 1, 1)
    W = weights()
    codes, s_1, z_1 = slices.decompose(W, 32, slice_bits)
    total = sum(slices.slice_delta(c, s_1, z_1, slice_bits, e) for e, c in enumerate(codes, start=1))
    torch.testing.assert_close(total, slices.reconstruct(codes, s_1, z_1, slice_bits), rtol=0, atol=1e-6)


def test_sqnr_rises_about_12_db_per_2_bit_slice():
    W = torch.randn(256, 512) * 0.02
    codes, s_1, z_1 = slices.decompose(W, 64, (2, 2, 2, 2))
    sqnr = []
    for k in range(1, 5):
        err = slices.reconstruct(codes[:k], s_1, z_1, (2, 2, 2, 2)) - W
        sqnr.append(10 * torch.log10(W.pow(2).mean() / err.pow(2).mean()).item())
    gains = [b - a for a, b in zip(sqnr, sqnr[1:])]
    assert sqnr[0] > 5 and all(11 < g < 13 for g in gains), sqnr


def test_clipping_factors_shrink_the_range():
    W = weights()
    _, s_full, _ = slices.decompose(W, 64, (2, 2))
    G = W.shape[1] // 64
    clip = torch.full((W.shape[0], G), 0.5)
    codes, s_clip, z_clip = slices.decompose(W, 64, (2, 2), clip_max=clip, clip_min=clip)
    assert (s_clip <= s_full * 0.5 + 1e-3).all()
    assert int(codes[0].max()) == 3 and int(codes[0].min()) == 0  # clipped weights saturate


def test_fake_quantize_ste_values_and_gradients():
    slice_bits = (2, 2, 2, 2)
    W = weights()
    G = W.shape[1] // 64
    gamma = torch.full((W.shape[0], G), 4.0, requires_grad=True)  # OmniQuant init: sigmoid(4) ≈ 0.982
    s_1, z_1 = slices.base_qparams(W, 64, 2, torch.sigmoid(gamma), torch.sigmoid(gamma), storage_dtype=None)
    for k in (1, 3):
        W_k = slices.fake_quantize_ste(W, s_1, z_1, slice_bits, k)
        codes = slices.split_slices(slices.quantize_codes(W, s_1.detach(), z_1.detach(), slice_bits), slice_bits)
        ref = slices.reconstruct(codes[:k], s_1.detach(), z_1.detach(), slice_bits)
        torch.testing.assert_close(W_k.detach(), ref, rtol=0, atol=1e-6)
    loss = (slices.fake_quantize_ste(W, s_1, z_1, slice_bits, 1) - W).pow(2).sum()
    loss.backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0 and torch.isfinite(gamma.grad).all()


def plain_fake_quantize_ste(W, s_1, z_1, slice_bits, k):
    """The formula with autograd's own straight-through graph (what the fused levels must reproduce)."""
    shift = slices.cumulative_bits(slice_bits)[k - 1] - slice_bits[0]
    g = W.shape[1] // s_1.shape[1]
    s_k, zk = (s_1 * 2.0**-shift)[..., None], (z_1 * 2.0**shift)[..., None]
    u = slices.group_view(W.float(), g) / s_k + zk
    q = (u + (torch.floor(u) - u).detach()).clamp(0, 2 ** slices.cumulative_bits(slice_bits)[k - 1] - 1)
    return (s_k * (q - zk + 0.5)).reshape(W.shape)


@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_fake_quantize_levels_match_autograd_values_and_gradients(slice_bits):
    gen = torch.Generator().manual_seed(len(slice_bits))
    W = torch.randn(24, 192, generator=gen)
    G = W.shape[1] // 64
    # clip factors well below 1 so that some weights saturate (the clamp's zero gradient is exercised)
    gamma0, beta0 = torch.randn(24, G, generator=gen), torch.randn(24, G, generator=gen)
    ks = list(range(1, len(slice_bits) + 1))
    ups = [torch.randn(W.shape, generator=gen) for _ in ks]  # fresh upstream gradients
    results = []
    for fused in (True, False):
        gamma, beta = gamma0.clone().requires_grad_(), beta0.clone().requires_grad_()
        s_1, z_1 = slices.base_qparams(W, 64, slice_bits[0], torch.sigmoid(gamma), torch.sigmoid(beta),
                                       storage_dtype=None)
        Wk = (slices.fake_quantize_ste(W, s_1, z_1, slice_bits, ks) if fused
              else [plain_fake_quantize_ste(W, s_1, z_1, slice_bits, k) for k in ks])
        sum((w * u).sum() for w, u in zip(Wk, ups)).backward()
        results.append(([w.detach() for w in Wk], gamma.grad, beta.grad))
    (w_f, gg_f, gb_f), (w_p, gg_p, gb_p) = results
    for a, b in zip(w_f, w_p):
        assert torch.equal(a, b)  # bit for bit: scaling by a power of two is exact
    assert gg_p.abs().min() > 0 and gb_p.abs().max() > 0
    torch.testing.assert_close(gg_f, gg_p)
    torch.testing.assert_close(gb_f, gb_p)
    one = slices.fake_quantize_ste(W, s_1.detach(), z_1.detach(), slice_bits, 2)  # an int k: one tensor
    assert torch.equal(one, w_p[1])
