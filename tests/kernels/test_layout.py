"""layout.py: the converter from the library's planes is exact, and the dense weight it implies is the library's."""

import pytest
import torch
from kernel_helpers import BITS, dense_ref, make_weight
from mobiquant.kernels import layout


def test_slot_is_a_permutation_pairing_registers():
    assert sorted(layout.SLOT) == list(range(16))


@pytest.mark.parametrize("N,K,g", [(781, 256, 128), (33, 192, 64), (8, 128, 32)])
def test_round_trip_exact(N, K, g):
    planes, s1, z1, _ = make_weight(N, K, g, seed=N + K)
    p = layout.pack_slices(planes, s1, z1, BITS)
    assert p.qweight.shape == (4, K // g, N, g // 16) and p.qweight.dtype == torch.int32
    assert p.scale.shape == (K // g, N) and p.group_size == g
    back, s, z = layout.unpack_slices(p)
    for a, b in zip(back, planes):
        assert torch.equal(a, b)
    assert torch.equal(s, s1) and torch.equal(z, z1)


def test_group_major_tile_is_contiguous():
    """The words of rows n0..n1 in group gi are one contiguous run of the flat plane, and hold that group's codes."""
    N, K, g = 50, 384, 128
    planes, s1, z1, codes = make_weight(N, K, g, seed=5)
    flat = layout.pack_slices(planes, s1, z1, BITS).qweight[1].reshape(-1)  # plane 2, as the kernels address it
    wpg, gi, n0, n1 = g // 16, 2, 7, 19
    run = flat[(gi * N + n0) * wpg:(gi * N + n1) * wpg].reshape(n1 - n0, wpg)
    slot = torch.tensor(layout.SLOT)
    got = (((run.long() & 0xFFFFFFFF)[..., None] >> (2 * slot)) & 3).reshape(n1 - n0, g)
    assert torch.equal(got, codes[1][n0:n1, gi * g:(gi + 1) * g].long())


def test_codes_and_dense_weight_exact():
    N, K, g = 97, 256, 128
    planes, s1, z1, codes = make_weight(N, K, g, seed=3)
    p = layout.pack_slices(planes, s1, z1, BITS)
    c = layout.unpack_codes(p)
    for e in range(4):
        assert torch.equal(c[e], codes[e].long())
    for k in range(1, 5):
        torch.testing.assert_close(layout.dense_weight(p, k), dense_ref(codes, s1, z1, k), atol=0, rtol=0)


def test_from_linear_matches_layer_weight():
    from mobiquant.config import MoBiQuantConfig
    from mobiquant.nn.linear import MoBiQuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 70, bias=False)
    q = MoBiQuantLinear.from_linear(lin, MoBiQuantConfig(slice_bits=BITS, group_size=128))
    p = layout.from_linear(q)
    for k in range(1, 5):
        torch.testing.assert_close(layout.dense_weight(p, k), q.weight_k(k), atol=0, rtol=0)


@pytest.mark.parametrize("bits", [(2, 2, 4), (4, 4), (2,) * 5])
def test_rejects_unsupported_slices(bits):
    planes = [torch.zeros(4, 128 * b // 8, dtype=torch.uint8) for b in bits]
    with pytest.raises(ValueError):
        layout.pack_slices(planes, torch.ones(4, 1).half(), torch.zeros(4, 1).half(), bits)
