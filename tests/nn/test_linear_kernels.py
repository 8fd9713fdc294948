"""MoBiQuantLinear on the kernel path (custom op mobiquant::sliced_linear) against its own torch path.

CPU: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) after marking "cpu" as a kernel
device type; GPU (`pytest -m gpu tests/nn`): the real path on CUDA, including a check that the forward never
synchronises with the host (torch.cuda.set_sync_debug_mode("error")).
"""

import pytest
import torch

from mobiquant import MoBiQuantConfig, MoBiQuantLinear, RoutingTrace, precision
from mobiquant.nn.router import MoBiRoute
from mobiquant.route import ThresholdTable

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(MoBiQuantLinear, "KERNEL_DEVICES", ("cuda", "cpu"))


def make(N=72, K=256, g=128, slice_bits=(2, 2, 2, 2), seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=True)
    return MoBiQuantLinear.from_linear(lin, MoBiQuantConfig(slice_bits=slice_bits, group_size=g)).to(DEVICE)


def reference(q, x, k):
    """The torch path on fp32 activations (the kernels' result is compared at fp16/bf16 tolerance)."""
    with torch.no_grad():
        return q.float()(x.float(), k if isinstance(k, int) else k.long()).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_path_matches_torch_path(kernel_on_cpu, dtype):
    q = make()
    x = torch.randn(2, 5, 256, device=DEVICE).to(dtype)
    qh = make().to(dtype)
    with torch.no_grad():
        assert qh.uses_kernels(x) and not q.uses_kernels(x.float())
    for k in (1, 2, 3, 4, torch.randint(1, 5, (2, 5))):
        with torch.no_grad():
            y = qh(x, k)
        ref = reference(q, x, k.to(DEVICE) if isinstance(k, torch.Tensor) else k)
        assert y.dtype == dtype and torch.isfinite(y).all()
        tol = (1e-3 if dtype == torch.float16 else 1e-2) * ref.abs().max().item()
        torch.testing.assert_close(y.float(), ref, atol=tol, rtol=0)


def test_kernel_path_budget_routing_and_trace(kernel_on_cpu):
    q = make().half()
    q.name = "model.layers.0.mlp.up_proj"
    q.router = MoBiRoute(256, 4, 8).to(DEVICE)
    q.router.set_calibration_scores_(q.router(torch.randn(256, 256, device=DEVICE)).detach())
    q.thresholds = ThresholdTable({q.name: q}, "layer")
    x = torch.randn(1, 9, 256, device=DEVICE).half()
    tr_k, tr_t = RoutingTrace(), RoutingTrace()
    with torch.no_grad(), precision(budget=5.0, trace=tr_k):
        assert q.uses_kernels(x)
        y = q(x)
    counts = tr_k.counts[q.name][0].reshape(1, 9)
    q.use_kernels = False
    with torch.no_grad(), precision(budget=5.0, trace=tr_t):
        ref = q(x).float()  # the dense torch path, same fp16 input (so the routers see the same x)
    assert torch.equal(counts, tr_t.counts[q.name][0].reshape(1, 9))
    assert tr_k.realized_bits() == tr_t.realized_bits()
    torch.testing.assert_close(y.float(), ref, atol=2e-3 * ref.abs().max().item(), rtol=0)


def test_kernel_cache_cleared_when_moved_or_cast(kernel_on_cpu):
    q = make().half()
    x = torch.randn(3, 256, device=DEVICE).half()
    with torch.no_grad():
        y1 = q(x, 2)
    assert len(q._packed) == 1
    P = q.packed()
    q.plane_2.zero_()  # a change the cache would hide: moving / casting must rebuild it
    q = q.to(torch.float16)
    assert q._packed == {}
    with torch.no_grad():
        y2 = q(x, 2)
    assert q.packed() is not P and not torch.equal(y1, y2)


def test_configurations_without_kernels_keep_the_torch_path(kernel_on_cpu):
    x = torch.randn(2, 256, device=DEVICE).half()
    q = make(slice_bits=(3, 1, 1, 1, 1, 1), g=64).half()
    with torch.no_grad():
        assert not q.kernel_compatible and not q.uses_kernels(x)
        y = q(x, 3)
    torch.testing.assert_close(y.float(), reference(q, x, 3), atol=2e-3 * y.abs().max().item(), rtol=0)
    q = make().half()
    assert not q.uses_kernels(x)  # autograd records the forward (bias requires grad): the op has no backward
    with torch.no_grad():
        assert q.uses_kernels(x)
        q.use_kernels = False
        assert not q.uses_kernels(x)


def test_cpu_without_kernel_flag_stays_on_torch():
    q = make().half().cpu()
    assert not q.uses_kernels(torch.randn(2, 256).half())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_forward_never_synchronises():
    q = make(N=4096, K=4096).half()
    x = torch.randn(1, 1, 4096, device="cuda").half()
    k = torch.full((1, 1), 3, dtype=torch.long, device="cuda")
    tr = RoutingTrace()
    with torch.no_grad():
        q(x, k)  # warm-up: compile, conversion to the kernel layout
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with precision(k=k, trace=tr):
                y = q(x)
            y2 = q(x, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tr.realized_bits() == 6.0 and y.shape == (1, 1, 4096) and torch.isfinite(y2).all()
