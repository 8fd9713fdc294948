"""The shared-memory ring of the batch-1 decode kernel (kernels/bulk_ring.py; ``sliced_gemv_cc`` config bits RING,
REARLY, RCAP): its words, s_1 and z_1 come by bulk copies instead of register loads, with the same arithmetic in
the same order, so every output must equal the register path's bit for bit.

CPU: the PTX texts (which copies, on which barrier, only thread 0 issuing), the stage count, and the launcher
ignoring the ring where it cannot run (the interpreter: same output as without it).
GPU (`pytest -m gpu tests/kernels`): the ring against the register loads on fresh random inputs, int8 and fp16
activations, every k, mixed tokens, a partial last tile, several weights in one launch, one and two stages, the
first stages issued before the PDL wait, the fused router's counts; rows that are not a multiple of 8 (ring off).
"""

import re

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, make_weight  # noqa: E402
from mobiquant.kernels import pack_slices, quantize_x_int8, sliced_gemv_cc  # noqa: E402
from mobiquant.kernels import router as rk  # noqa: E402
from mobiquant.kernels.bulk_ring import _RING, asm_ring_issue_text, ring_stages  # noqa: E402

_SEED = iter(range(80_000, 90_000))


# ------------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("e0,e1,sz,arrive", [(0, 1, True, True), (0, 4, True, True), (0, 1, True, False),
                                             (1, 1, False, True), (1, 3, False, True)])
def test_issue_text(e0, e1, sz, arrive):
    """The planes e0..e1-1 (and s, z) are copied onto the stage's barrier, sizes and operands as documented, only by
    the predicated thread; the arrival only where asked; no proxy fence (ordered by the CTA barrier instead)."""
    text = asm_ring_issue_text(e0, e1, sz, arrive)
    copies = re.findall(r"@p cp\.async\.bulk\.shared::cluster\.global\.mbarrier::complete_tx::bytes "
                        r"\[\$(\d+)\], \[\$(\d+)\], \$(\d), \[\$1\];", text)
    want = list(range(e0, e1)) + ([4, 5] if sz else [])
    assert [(int(d) - 5, int(s) - 11, int(n)) for d, s, n in copies] == [(i, i, 3 if i < 4 else 4) for i in want]
    assert ("mbarrier.arrive.expect_tx" in text) == arrive and ("mbarrier.expect_tx" in text) != arrive
    assert "fence.proxy" not in text
    assert all(line.startswith("@p ") for line in text.splitlines() if "mbarrier" in line or "cp.async" in line)


def test_stages():
    """Two stages of 128 rows at any k (a stage holds 4 planes), four of 64; the cap lowers it."""
    assert ring_stages(128) == 2 and ring_stages(64) == 4 and ring_stages(128, 1) == 1 and ring_stages(64, 3) == 3
    assert all(ring_stages(bn) * 132 * bn <= _RING for bn in (16, 32, 64, 128, 256))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case")
def test_interpreter_ignores_the_ring():
    """Where the ring cannot run (no PTX under the interpreter), a config asking for it gives the register path's
    output."""
    pl, s1, z1, _ = make_weight(96, 256, 128, next(_SEED))
    p = pack_slices(pl, s1, z1)
    x = torch.randn(2, 256).half()
    k = torch.tensor([1, 3], dtype=torch.int32)
    cfg = dict(BLOCK_N=32, SPLIT_K=2, num_warps=2, PF=1, MMA=15)
    y = sliced_gemv_cc(x, p, k, config=dict(cfg, RING=15, REARLY=1))
    assert torch.equal(y, sliced_gemv_cc(x, p, k, config=cfg))


# ------------------------------------------------------------------------------------------------------------- GPU
def _weights(Ns, K):
    seed = next(_SEED)
    return [pack_slices(*make_weight(N, K, 128, seed + i, DEVICE)[:3]) for i, N in enumerate(Ns)]


def _both(x, packs, k, cfg, ring, a8):
    """(ring output, register output), outputs poisoned before each launch."""
    xa = quantize_x_int8(x) if a8 else None
    w = packs if len(packs) > 1 else packs[0]
    ys = []
    for extra in (ring, {}):
        y = torch.full((x.shape[0], sum(p.out_features for p in packs)), float("nan"), dtype=torch.float16,
                       device=DEVICE)
        sliced_gemv_cc(x, w, k, out=y, config=dict(cfg, **extra), x_int8=xa)
        ys.append(y)
    return ys


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("a8", [True, False])
@pytest.mark.parametrize("Ns,K,kv,cfg,ring", [
    ((1000,), 1024, [1], dict(BLOCK_N=128, SPLIT_K=4), {"RING": 15}),  # a partial last tile (104 rows)
    ((1000,), 1024, [2], dict(BLOCK_N=128, SPLIT_K=4), {"RING": 15, "REARLY": 1}),
    ((512,), 2048, [3], dict(BLOCK_N=64, SPLIT_K=2), {"RING": 15, "REARLY": 1}),  # 4 stages, 8 groups a split
    ((512,), 2048, [4], dict(BLOCK_N=128, SPLIT_K=1), {"RING": 15, "RCAP": 1}),  # one stage, 16 groups
    ((512, 128, 128), 1024, [2], dict(BLOCK_N=128, SPLIT_K=4), {"RING": 15, "REARLY": 1}),  # q/k/v in one launch
    ((384, 384), 1024, [4], dict(BLOCK_N=128, SPLIT_K=8, SPLIT_K12=2), {"RING": 15}),  # gate/up, fewer splits
    ((256,), 3584, [3, 1, 4, 2], dict(BLOCK_N=128, SPLIT_K=7), {"RING": 15, "REARLY": 1}),  # mixed tokens
    ((256,), 1024, [1, 2], dict(BLOCK_N=128, SPLIT_K=4), {"RING": 3}),  # ring at k <= 2 only
])
def test_gpu_ring_equals_register_loads(a8, Ns, K, kv, cfg, ring):
    packs = _weights(Ns, K)
    x = torch.randn(len(kv), K, device=DEVICE).half() * 3
    k = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    if len(Ns) > 1:
        k = k.view(-1, 1).repeat(1, len(Ns)).contiguous()
    cfg = dict(cfg, GPI=1, num_warps=4, num_stages=1, PF=1, PDL=1, **({} if a8 else {"MMA": 15}))
    y_ring, y_reg = _both(x, packs, k, cfg, ring, a8)
    assert torch.isfinite(y_reg).all()
    assert torch.equal(y_ring, y_reg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("a8", [True, False])
def test_gpu_rows_not_a_multiple_of_8_fall_back(a8):
    """781 rows: s and z of the last tile are not whole 16-byte pieces, so the launcher runs the register loads."""
    packs = _weights((781,), 1024)
    x = torch.randn(1, 1024, device=DEVICE).half()
    for kk in (1, 2, 3, 4):
        k = torch.tensor([kk], dtype=torch.int32, device=DEVICE)
        cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=4, num_warps=4, PF=1, PDL=1, **({} if a8 else {"MMA": 15}))
        y_ring, y_reg = _both(x, packs, k, cfg, {"RING": 15, "REARLY": 1}, a8)
        assert torch.equal(y_ring, y_reg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("a8", [True, False])
def test_gpu_ring_with_the_fused_router(a8):
    """Counts finished in the linear from the router's partials (after the PDL wait, while the early stages land):
    the counts and the output equal those of the register path on the same plan, in a CUDA graph and eagerly."""
    g = torch.Generator().manual_seed(next(_SEED))
    Ns, K, E, H = (512, 128, 128), 1024, 4, 16
    packs = _weights(Ns, K)
    R = len(Ns)
    s = (torch.rand(R, K, generator=g) + 0.5).to(DEVICE)  # the router group as the engine stacks it (fp32)
    w1 = (torch.randn(R, H, K, generator=g) * K ** -0.5).to(DEVICE)
    b1 = (torch.randn(R, H, generator=g) * 0.1).to(DEVICE)
    w2 = (torch.randn(R, E - 1, H, generator=g) * H ** -0.5).to(DEVICE)
    b2 = (torch.randn(R, E - 1, generator=g) * 0.05).to(DEVICE)
    tau = (torch.randn(R, generator=g) * 0.05).to(DEVICE)
    zero = torch.zeros(E - 1, dtype=torch.bool, device=DEVICE)
    given = torch.zeros(R, dtype=torch.bool, device=DEVICE)
    cin = torch.ones(R, dtype=torch.int32, device=DEVICE)
    cfg = dict(BLOCK_N=128, GPI=1, SPLIT_K=4, num_warps=4, num_stages=1, PF=1, PDL=1, **({} if a8 else {"MMA": 15}))
    x = torch.randn(K, generator=g).half().to(DEVICE)
    outs = {}
    for name, extra in (("ring", {"RING": 15, "REARLY": 1}), ("register", {})):
        counts = torch.full((R,), -7, dtype=torch.int32, device=DEVICE)
        y = torch.full((1, sum(Ns)), float("nan"), dtype=torch.float16, device=DEVICE)
        xq = (torch.empty(1, K // 4, dtype=torch.int32, device=DEVICE),
              torch.empty(1, K // 128, 2, dtype=torch.float32, device=DEVICE)) if a8 else None

        def step(counts=counts, y=y, xq=xq, extra=extra):
            plan = rk.route_partials(x, s, w1, b1, w2, b2, tau, zero, zero, given, cin, out=counts,
                                     x_int8=xq)
            sliced_gemv_cc(x[None], packs, None, out=y, config=dict(cfg, **extra), route=plan, x_int8=xq)

        step()
        eager = (counts.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        counts.fill_(-7)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(counts, eager[0]) and torch.equal(y, eager[1])
        outs[name] = eager
    assert torch.equal(outs["ring"][0], outs["register"][0]) and torch.equal(outs["ring"][1], outs["register"][1])
    assert ((outs["ring"][0] >= 1) & (outs["ring"][0] <= E)).all()  # every count written (poisoned with -7)
