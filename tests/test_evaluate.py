import math

import pytest
import torch
import torch.nn.functional as F

from mobiquant import MoBiQuantConfig, MoBiQuantError
from mobiquant.evaluate import EvalSetup, make_windows, perplexity, read_text, run_methods


def test_windows():
    ids = torch.arange(100)
    w = make_windows(ids, 30)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), ids[:90])
    assert make_windows(ids, 30, windows=2).shape == (2, 30)
    with pytest.raises(MoBiQuantError, match="fewer than one window"):
        make_windows(ids, 101)
    with pytest.raises(MoBiQuantError, match="at least 1"):
        make_windows(ids, 10, windows=0)


def test_perplexity_matches_manual_nll(tiny_llama):
    windows = torch.randint(0, 96, (3, 20))
    ppl, tokens = perplexity(tiny_llama, windows)
    with torch.no_grad():
        logits = tiny_llama(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1))
    assert tokens == 60 and math.isclose(ppl, math.exp(nll.item()), rel_tol=1e-5)


def test_methods_on_a_tiny_model(tiny_llama):
    windows = torch.randint(0, 96, (2, 24))
    setup = EvalSetup(windows, MoBiQuantConfig(group_size=32), load_fp=lambda: tiny_llama, progress=False)
    rows = list(run_methods(setup, ["fp", "rtn", "slices"], [2.0, 8.0]))
    assert [(r.method, r.bits_requested) for r in rows] == [
        ("fp", None), ("rtn", 2.0), ("rtn", 8.0), ("slices", 2.0), ("slices", 8.0)]
    ppl = {(r.method, r.bits_requested): r.ppl for r in rows}
    assert abs(ppl[("slices", 8.0)] / ppl[("fp", None)] - 1) < 0.01
    assert ppl[("slices", 2.0)] > ppl[("slices", 8.0)]
    # rtn restored the weights afterwards: fp is unchanged
    assert math.isclose(perplexity(tiny_llama, windows)[0], ppl[("fp", None)], rel_tol=1e-6)


@pytest.mark.parametrize("methods, bits, message", [
    (["nope"], [4.0], "unknown method"),
    (["rtn"], [1.0], "integer width 2..8"),
    (["rtn"], [4.5], "integer width 2..8"),
    (["slices"], [3.0], "not a uniform precision"),
])
def test_bad_methods_or_bits(tiny_llama, methods, bits, message):
    setup = EvalSetup(torch.zeros(1, 4, dtype=torch.long), MoBiQuantConfig(), load_fp=lambda: tiny_llama)
    with pytest.raises(MoBiQuantError, match=message):
        list(run_methods(setup, methods, bits))


def test_read_text_errors(tmp_path):
    with pytest.raises(MoBiQuantError, match="no such text file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(MoBiQuantError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MoBiQuantError, match="not UTF-8"):
        read_text(tmp_path / "bin.txt")
