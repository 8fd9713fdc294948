import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mobiquant import MoBiQuantConfig, MoBiQuantError, load_quantized, precision, quantize_, save_quantized
from mobiquant.calibrate import fit_fisher_
from mobiquant.io import WEIGHTS_FILE
from mobiquant.route import attach_thresholds_


def logits(model, ids, k):
    with torch.no_grad(), precision(k=k):
        return model(input_ids=ids).logits


@pytest.fixture
def saved(tiny_llama, tmp_path):
    quantize_(tiny_llama, MoBiQuantConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=32))
    save_quantized(tiny_llama, tmp_path / "ckpt")
    return tiny_llama, tmp_path / "ckpt"


@pytest.mark.parametrize("family", ["tied llama", "qwen2 with bias"])
def test_round_trip_identical_logits(family, tiny_llama, tiny_qwen2, tmp_path):
    model = tiny_llama if family == "tied llama" else tiny_qwen2
    quantize_(model, MoBiQuantConfig(group_size=32))
    save_quantized(model, tmp_path)
    loaded, tok = load_quantized(tmp_path)
    assert tok is None and loaded.mobiquant_config == model.mobiquant_config
    ids = torch.randint(0, 96, (2, 10))
    for k in (1, 2, 4):
        assert torch.equal(logits(loaded, ids, k), logits(model, ids, k))
    mixed = torch.randint(1, 5, (2, 10))
    assert torch.equal(logits(loaded, ids, mixed), logits(model, ids, mixed))
    if family == "tied llama":  # tied embeddings are stored once and shared again after loading
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_load_does_not_allocate_full_weights(saved, monkeypatch):
    """The architecture is built on the meta device: no nn.Linear weight is ever allocated for sliced layers."""
    import torch.nn as nn

    created = []
    orig = nn.Linear.reset_parameters
    monkeypatch.setattr(nn.Linear, "reset_parameters",
                        lambda self: created.append(self.weight.device.type) or orig(self))
    load_quantized(saved[1])
    assert created and set(created) == {"meta"}


def test_unquantized_model_cannot_be_saved(tiny_llama, tmp_path):
    with pytest.raises(MoBiQuantError, match="not quantized"):
        save_quantized(tiny_llama, tmp_path)


def test_truncated_file(saved):
    f = saved[1] / WEIGHTS_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoBiQuantError, match="corrupt or truncated"):
        load_quantized(saved[1])


def test_foreign_safetensors(saved):
    save_file({"x": torch.zeros(2)}, str(saved[1] / WEIGHTS_FILE))
    with pytest.raises(MoBiQuantError, match="not a mobiquant checkpoint"):
        load_quantized(saved[1])


def test_not_safetensors_at_all(saved):
    (saved[1] / WEIGHTS_FILE).write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    with pytest.raises(MoBiQuantError, match="corrupt or truncated"):
        load_quantized(saved[1])


def test_mismatched_architecture(saved):
    cfg = json.loads((saved[1] / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved[1] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoBiQuantError, match="do not fit|does not match"):
        load_quantized(saved[1])


def test_mismatched_slices(saved):
    info = json.loads((saved[1] / "mobiquant_config.json").read_text())
    info["mobiquant"]["slice_bits"] = [2, 2, 2, 2]
    (saved[1] / "mobiquant_config.json").write_text(json.dumps(info))
    with pytest.raises(MoBiQuantError, match="do not fit|does not match"):
        load_quantized(saved[1])


def test_missing_or_foreign_directory(tmp_path):
    with pytest.raises(MoBiQuantError, match="no such checkpoint"):
        load_quantized(tmp_path / "nope")
    with pytest.raises(MoBiQuantError, match="not a mobiquant checkpoint"):
        load_quantized(tmp_path)
    (tmp_path / "mobiquant_config.json").write_text("{not json")
    with pytest.raises(MoBiQuantError, match="not valid JSON"):
        load_quantized(tmp_path)
    (tmp_path / "mobiquant_config.json").write_text('{"format": "other"}')
    with pytest.raises(MoBiQuantError, match="not written by mobiquant"):
        load_quantized(tmp_path)


def test_round_trip_keeps_cost_curves_and_old_checkpoints_without_them_load(tiny_llama, routed_model, tmp_path):
    routed_model(tiny_llama, hidden=16)  # the config's router width
    fit_fisher_(tiny_llama, torch.randint(0, 96, (2, 16)), progress=False)
    save_quantized(tiny_llama, tmp_path / "new")
    loaded, _ = load_quantized(tmp_path / "new")
    assert loaded.mobiquant_thresholds == "balanced" and loaded.mobiquant_allocation == "fisher"
    ids = torch.randint(0, 96, (1, 12))
    attach_thresholds_(tiny_llama, "balanced", "fisher")
    with torch.no_grad(), precision(budget=4.5):
        assert torch.equal(loaded(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(loaded.get_submodule(name).router.fisher_cost, tiny_llama.get_submodule(name).router.fisher_cost)
    # a checkpoint written before the curves existed: band allocation, no fisher_* tensors
    old = tmp_path / "old"
    save_quantized(tiny_llama, old)
    with safe_open(str(old / WEIGHTS_FILE), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(str(old / WEIGHTS_FILE)).items() if ".fisher_" not in k}
    save_file(tensors, str(old / WEIGHTS_FILE), metadata=metadata)
    meta = json.loads((old / "mobiquant_config.json").read_text())
    meta["mobiquant"]["allocation"] = "band"
    (old / "mobiquant_config.json").write_text(json.dumps(meta))
    loaded_old, _ = load_quantized(old)
    assert loaded_old.get_submodule(name).router.fisher_cost.numel() == 0
    with pytest.raises(MoBiQuantError, match="cost curve"):
        attach_thresholds_(loaded_old, "balanced", "fisher")
