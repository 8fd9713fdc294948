"""The custom ops (mobiquant/ops.py): schema and fake implementations (torch.library.opcheck), torch.compile without
graph breaks, and the real implementations against the pure-torch references. On a CPU host the Triton kernels run in
the interpreter (TRITON_INTERPRET=1, tests/conftest.py); on a GPU host on CUDA."""

import pytest
import torch

from mobiquant import ops
from mobiquant.quant import packing, slices

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_weight(N, K, g, seed):
    from mobiquant.kernels import pack_slices

    gen = torch.Generator().manual_seed(seed)
    codes, s1, z1 = slices.decompose(torch.randn(N, K, generator=gen), g, (2, 2, 2, 2))
    planes = [packing.pack_nbit_u8(c, 2).to(DEVICE) for c in codes]
    return pack_slices(planes, s1.half().to(DEVICE), z1.half().to(DEVICE))


def linear_args(M=3, N=72, K=256, g=128, seed=0, bias=True):
    P = packed_weight(N, K, g, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=gen).half().to(DEVICE)
    k = torch.randint(1, 5, (M,), generator=gen, dtype=torch.int32).to(DEVICE)
    b = torch.randn(N, generator=gen).half().to(DEVICE) if bias else None
    return (x, P.qweight, P.scale, P.zero, k, b, g), P


def router_args(R=3, H=8, K=192, E=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    x = t(K).half()
    s = (torch.rand(R, K, generator=gen) + 0.5).to(DEVICE)
    tau = (torch.randn(R, generator=gen) * 0.5).to(DEVICE)
    on = torch.zeros(E - 1, dtype=torch.bool, device=DEVICE)
    given = torch.tensor([False] * (R - 1) + [True], device=DEVICE)
    cin = torch.full((R,), 3, dtype=torch.int32, device=DEVICE)
    return (x, s, t(R, H, K) * K ** -0.5, t(R, H), t(R, E - 1, H), t(R, E - 1), tau, on, on.clone(), given, cin)


def test_sliced_linear_opcheck():
    args, _ = linear_args()
    torch.library.opcheck(torch.ops.mobiquant.sliced_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_route_counts_opcheck():
    torch.library.opcheck(torch.ops.mobiquant.route_counts.default, router_args(),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bias", [True, False])
def test_sliced_linear_matches_reference(bias):
    for seed in range(3):  # fresh inputs each time
        args, P = linear_args(M=4, seed=10 * seed, bias=bias)
        y = torch.ops.mobiquant.sliced_linear(*args)
        ref = ops.sliced_linear_ref(args[0], P, args[4], args[5]).float()
        torch.testing.assert_close(y.float(), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


def test_sliced_linear_compiles_without_graph_break():
    (x, qw, sc, z, k, b, g), P = linear_args(M=2)

    def f(x, k):
        return torch.ops.mobiquant.sliced_linear(torch.nn.functional.silu(x), qw, sc, z, k, b, g) * 2

    with torch.no_grad():
        y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, k)
    torch.testing.assert_close(y, f(x, k), atol=0, rtol=0)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    (x, qw, sc, z, k, b, g), _ = linear_args(M=5)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.mobiquant.sliced_linear(x.reshape(1, 5, -1), qw, sc, z, k.reshape(1, 5), b, g)
        c = torch.ops.mobiquant.route_counts(*router_args(R=2))
    assert y.shape == (1, 5, 72) and y.dtype == torch.float16
    assert c.shape == (2,) and c.dtype == torch.int32


def glue_args(seed=0, H=4, KV=2, DH=16, S=12, pos=5):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *sh: torch.randn(*sh, generator=gen).half().to(DEVICE)
    p = torch.tensor([pos], device=DEVICE)
    return dict(h=t(1, 64), r=t(1, 64), w=t(64), q=t(1, H * DH), k=t(1, KV * DH), v=t(1, KV * DH), cos=t(S, DH),
                sin=t(S, DH), pos=p, kc=t(KV, S, DH), vc=t(KV, S, DH), qr=t(H, DH), g=t(1, 40), u=t(1, 40))


def test_decode_glue_opcheck():
    a = glue_args()
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mobiquant.add_rms_norm.default, (a["h"], a["r"], a["w"], 1e-5), test_utils=tests)
    torch.library.opcheck(torch.ops.mobiquant.add_rms_norm.default, (a["h"], None, a["w"], 1e-5), test_utils=tests)
    torch.library.opcheck(torch.ops.mobiquant.rope_kv.default,
                          (a["q"], a["k"], a["v"], a["cos"], a["sin"], a["pos"], a["kc"], a["vc"]), test_utils=tests)
    torch.library.opcheck(torch.ops.mobiquant.decode_attention.default,
                          (a["qr"], a["kc"], a["vc"], a["pos"], 0, 0.25), test_utils=tests)
    torch.library.opcheck(torch.ops.mobiquant.silu_mul.default, (a["g"], a["u"]), test_utils=tests)


def test_decode_glue_ops_match_references():
    for seed in range(2):
        a = glue_args(seed + 3)
        for x, y in zip(torch.ops.mobiquant.add_rms_norm(a["h"], a["r"], a["w"], 1e-5),
                        ops.add_rms_norm_ref(a["h"], a["r"], a["w"], 1e-5)):
            torch.testing.assert_close(x.float(), y.float(), atol=2e-3 * y.abs().max().item(), rtol=0)
        kc2, vc2 = a["kc"].clone(), a["vc"].clone()
        q1 = torch.ops.mobiquant.rope_kv(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["pos"], a["kc"], a["vc"])
        q2 = ops.rope_kv_ref(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["pos"], kc2, vc2)
        assert torch.equal(q1, q2) and torch.equal(a["kc"], kc2) and torch.equal(a["vc"], vc2)
        o1 = torch.ops.mobiquant.decode_attention(q1, a["kc"], a["vc"], a["pos"], 3, 0.25)
        o2 = ops.decode_attention_ref(q1, a["kc"], a["vc"], a["pos"], 3, 0.25)
        torch.testing.assert_close(o1.float(), o2.float(), atol=2e-3 * o2.abs().max().item(), rtol=0)
        y1, y2 = torch.ops.mobiquant.silu_mul(a["g"], a["u"]), ops.silu_mul_ref(a["g"], a["u"])
        torch.testing.assert_close(y1.float(), y2.float(), atol=2e-3 * y2.abs().max().item(), rtol=0)


def multi_args(seed=0, bias=True):
    Ps = [packed_weight(N, 256, 128, seed + i) for i, N in enumerate((48, 16, 16))]
    gen = torch.Generator().manual_seed(seed + 5)
    x = torch.randn(1, 256, generator=gen).half().to(DEVICE)
    k = torch.randint(1, 5, (1, 3), generator=gen, dtype=torch.int32).to(DEVICE)
    b = torch.randn(80, generator=gen).half().to(DEVICE) if bias else None
    return (x, [P.qweight for P in Ps], [P.scale for P in Ps], [P.zero for P in Ps], k, b, 128), Ps


def test_sliced_linear_multi_opcheck_and_reference():
    args, _ = multi_args()
    torch.library.opcheck(torch.ops.mobiquant.sliced_linear_multi.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    for seed, bias in ((1, True), (2, False)):  # fresh inputs; each weight at its own k
        args, Ps = multi_args(10 * seed, bias)
        y = torch.ops.mobiquant.sliced_linear_multi(*args)
        ref = ops.sliced_linear_multi_ref(args[0], Ps, args[4], args[5]).float()
        assert y.shape == (1, 80)
        torch.testing.assert_close(y.float(), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


def test_kernel_compatible():
    assert ops.kernel_compatible((2, 2, 2, 2), 4096, 128)
    assert ops.kernel_compatible((2,), 4096, 32)
    assert not ops.kernel_compatible((3, 1, 1, 1, 1, 1), 4096, 128)
    assert not ops.kernel_compatible((2,) * 5, 4096, 128)
    assert not ops.kernel_compatible((2, 2, 2, 2), 4096, 16)
    assert not ops.kernel_compatible((2, 2, 2, 2), 4104, 8)
