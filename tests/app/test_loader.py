"""load_served: the first run calibrates (--fast) and caches, the next reuses it; bad checkpoints fail clearly."""

from __future__ import annotations

import pytest
import torch

from app.loader import app_cache_dir, load_served
from mobiquant import MoBiQuantConfig, MoBiQuantError, quantized_linears
from mobiquant.quant import int4pack


def test_first_run_calibrates_and_caches_then_reuses(tiny_dir):
    config = MoBiQuantConfig(group_size=32)
    assert not (app_cache_dir(str(tiny_dir), config) / "mobiquant_config.json").exists()
    first = load_served(str(tiny_dir), config=config, progress=False)
    assert first.checkpoint == app_cache_dir(str(tiny_dir), config)
    assert all(m.router is not None for m in quantized_linears(first.model).values())
    assert first.model.mobiquant_thresholds == "balanced"  # decoding: per-layer table and per-token tally
    if int4pack.available():  # CPU: 2 and 4 bits as int4 weights, 6 and 8 as fp16, all built at start-up
        for m in quantized_linears(first.model).values():
            assert m.int4_slices == set(m._int4) == {1, 2}
            assert {k for k, _, _ in m._dense} == {3, 4} and m.dense_dtype == torch.float16
    name = next(iter(quantized_linears(first.model)))
    w_first = first.fp_weight(name)  # kept from the calibration run
    second = load_served(str(tiny_dir), config=config, progress=False)  # from the cache, no calibration
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert torch.equal(second.fp_weight(name), w_first)  # loaded from the source model on demand


def test_bad_checkpoints(tmp_path):
    with pytest.raises(MoBiQuantError, match="no such checkpoint"):
        load_served(checkpoint=tmp_path / "missing")
