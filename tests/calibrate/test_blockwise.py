import copy

import pytest
import torch

import mobiquant
from mobiquant import MoBiQuantConfig, MoBiQuantError, precision
from mobiquant.calibrate import CalibConfig, calibrate_
from mobiquant.calibrate.blockwise import CalibLinear, _block_loss, capture_block_inputs
from mobiquant.quant.rtn import rtn_quantize
from mobiquant.trace import RoutingTrace


def logits_error(model, ref, tokens, **prec):
    with torch.no_grad(), precision(**prec):
        return float((model(input_ids=tokens).logits - ref(input_ids=tokens).logits).pow(2).mean())


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))


def test_calibration_lowers_error_below_rtn(tiny_llama, tokens):
    """Stage 1 (clipping) at the 2-bit base slice beats 2-bit RTN (min/max endpoints) on held-out tokens. The
    weights are made heavy-tailed (Student t, as real LLM weights are), where the range matters."""
    for lin in mobiquant.api.target_linears(tiny_llama, MoBiQuantConfig()).values():
        lin.weight.data = 0.02 * torch.distributions.StudentT(2.5).sample(lin.weight.shape)
    ref = copy.deepcopy(tiny_llama)
    rtn = copy.deepcopy(tiny_llama)
    for lin in mobiquant.api.target_linears(rtn, MoBiQuantConfig()).values():
        lin.weight.data = rtn_quantize(lin.weight.data, 2, 32)
    cal = calibrate_(tiny_llama, None, MoBiQuantConfig(group_size=32),
                     CalibConfig(samples=16, seqlen=32, epochs=3, stages=("clip",)), tokens=tokens, progress=False)
    held_out = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    assert logits_error(cal, ref, held_out, k=1) < 0.9 * logits_error(rtn, ref, held_out)


def test_routers_are_trained_and_budgets_are_realized(tiny_llama, tokens):
    cal = calibrate_(tiny_llama, None, MoBiQuantConfig(group_size=32), CalibConfig(samples=16, seqlen=32, epochs=2),
                     tokens=tokens, progress=False)
    linears = mobiquant.quantized_linears(cal)
    assert all(m.router is not None and m.router.calib_scores.shape[1] == 3 for m in linears.values())
    assert all(m.router.fc1.weight.dtype == torch.float16 for m in linears.values())
    held_out = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    previous = 0.0
    for b in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        tr = RoutingTrace(keep=False)
        with torch.no_grad(), precision(budget=b, trace=tr):
            cal(input_ids=held_out)
        assert abs(tr.realized_bits() - b) < 0.2, (b, tr.realized_bits())  # 128 held-out calibration tokens
        assert tr.realized_bits() >= previous
        previous = tr.realized_bits()
    assert cal.mobiquant_calibration["seconds"] > 0 and len(cal.mobiquant_calibration["losses"]) == 2


def test_save_load_keeps_routers_and_thresholds(tiny_llama, tokens, tmp_path):
    cal = calibrate_(tiny_llama, None, MoBiQuantConfig(group_size=32, thresholds="global"),
                     CalibConfig.fast(samples=8, seqlen=32), tokens=tokens[:8], progress=False)
    mobiquant.save_quantized(cal, tmp_path)
    loaded, _ = mobiquant.load_quantized(tmp_path)
    assert loaded.mobiquant_thresholds == "global" and loaded.mobiquant_calibration["calib"].samples == 8
    ids = torch.randint(0, 96, (2, 16))
    for b in (2.5, 4.0, 7.0):
        with torch.no_grad(), precision(budget=b):
            assert torch.equal(loaded(input_ids=ids).logits, cal(input_ids=ids).logits)


def test_stage_two_without_clip_refinement_keeps_the_clipping_and_trains_the_routers(tiny_llama, tokens):
    """refine_clip=False: stage 2 trains the routers only, so block 0's clipping is its stage-1 clipping, the same
    as a run without stage 2 (same seed and data; later blocks see different inputs). With refinement it moves."""
    runs = {}
    for name, kw in {"clip only": {"stages": ("clip",)}, "frozen": {"refine_clip": False}, "refined": {}}.items():
        cal = calibrate_(copy.deepcopy(tiny_llama), None, MoBiQuantConfig(group_size=32),
                         CalibConfig.fast(samples=8, seqlen=32, **kw), tokens=tokens[:8], progress=False)
        runs[name] = {n: m for n, m in mobiquant.quantized_linears(cal).items() if ".layers.0." in n}
    for n, m in runs["frozen"].items():
        assert torch.equal(m.scale, runs["clip only"][n].scale) and torch.equal(m.zero, runs["clip only"][n].zero)
        assert m.router is not None and m.router.calib_scores.numel() > 0
    assert any(not torch.equal(m.scale, runs["clip only"][n].scale) for n, m in runs["refined"].items())


@pytest.mark.parametrize("budget", [3.0, 6.5])
def test_balanced_budgets_step_on_the_log_of_the_error(budget):
    """balance_budgets: stage 2's reconstruction term has the gradient of log(error), for the clipping and the
    router alike, so a step at a high budget (small error) moves them as much as one at a low budget."""
    torch.manual_seed(0)
    layer = CalibLinear(torch.nn.Linear(96, 80), MoBiQuantConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1)))
    layer.mode, layer.budget = "route", budget
    x = torch.randn(2, 24, 96)
    t = layer.linear(x).detach() + 0.05 * torch.randn(2, 24, 80)  # a target the block nearly reaches
    grads = {}
    for balance in (False, True):
        cfg = CalibConfig(balance_budgets=balance, budget_weight=0.0)
        loss = _block_loss(layer, {"l": layer}, x, t, {}, cfg)
        if not balance:
            plain, loss = loss.item(), loss.log()  # the reference: autograd through log(error)
        params = [layer.gamma, layer.beta, *layer.router.parameters()]
        grads[balance] = torch.autograd.grad(loss, params)
    assert 0 < plain < 0.5  # far from 1, where the two gradients would coincide
    for g_log, g_bal in zip(grads[False], grads[True]):
        assert g_bal.abs().max() > 0
        torch.testing.assert_close(g_bal, g_log, rtol=1e-4, atol=1e-7)


def test_capture_block_inputs_matches_embeddings(tiny_llama, tokens):
    X, kwargs = capture_block_inputs(tiny_llama, tiny_llama.model.layers, tokens[:5], batch=2)
    assert X.shape == (5, 32, 64)
    torch.testing.assert_close(X, tiny_llama.model.embed_tokens(tokens[:5]))
    assert "position_embeddings" in kwargs


def test_bad_calibration_settings():
    with pytest.raises(MoBiQuantError):
        CalibConfig(samples=0)
    with pytest.raises(MoBiQuantError):
        CalibConfig(next_input="sideways")
    with pytest.raises(MoBiQuantError):
        CalibConfig(stages=("dance",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_calibration_realizes_budgets(tiny_llama, tokens):
    """The whole recipe on CUDA (the routed mixture, the fused fake quantization, the cost curves, the thresholds)."""
    cal = calibrate_(tiny_llama.to("cuda"), None, MoBiQuantConfig(group_size=32, slice_bits=(3, 1, 1, 1)),
                     CalibConfig.fast(samples=16, seqlen=32), tokens=tokens, progress=False)
    held_out = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2)).cuda()
    for b in (3.0, 4.5, 6.0):
        tr = RoutingTrace(keep=False)
        with torch.no_grad(), precision(budget=b, trace=tr):
            logits = cal(input_ids=held_out).logits
        assert torch.isfinite(logits).all() and abs(tr.realized_bits() - b) < 0.2, (b, tr.realized_bits())
