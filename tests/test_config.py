import pytest

from mobiquant import MoBiQuantConfig, MoBiQuantError
from mobiquant.config import auto_group_size


def test_defaults_and_precisions():
    c = MoBiQuantConfig()
    assert c.slice_bits == (2, 2, 2, 2) and c.precisions == [2, 4, 6, 8] and c.num_slices == 4
    assert MoBiQuantConfig(slice_bits=[3, 1, 1, 1, 1, 1]).precisions == [3, 4, 5, 6, 7, 8]
    assert c.slices_for_bits(6) == 3


def test_auto_group_size_smollm_widths():
    assert auto_group_size(576) == 64 and auto_group_size(1536) == 128 and auto_group_size(96) == 32
    with pytest.raises(MoBiQuantError, match="not a multiple"):
        auto_group_size(100)


@pytest.mark.parametrize("kw", [
    {"slice_bits": ()}, {"slice_bits": (2, 0)}, {"slice_bits": (9,)}, {"slice_bits": (8, 8, 1)},
    {"slice_bits": (2.5, 2)}, {"group_size": 0}, {"group_size": 60}, {"group_size": -64}, {"version": 99},
])
def test_invalid_configs(kw):
    with pytest.raises(MoBiQuantError):
        MoBiQuantConfig(**kw)


def test_explicit_group_must_divide():
    with pytest.raises(MoBiQuantError, match="does not divide"):
        MoBiQuantConfig(group_size=128).group_size_for(576)


def test_unreachable_uniform_bits():
    with pytest.raises(MoBiQuantError, match="not a uniform precision"):
        MoBiQuantConfig().slices_for_bits(3)


def test_dict_round_trip():
    c = MoBiQuantConfig(slice_bits=(3, 1, 1), group_size=32, modules=("*.mlp.*",))
    assert MoBiQuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(MoBiQuantError, match="unknown"):
        MoBiQuantConfig.from_dict({"slice_bits": [2], "bogus": 1})


def test_default_allocation_follows_the_thresholds():
    from mobiquant import MoBiQuantConfig, MoBiQuantError

    assert MoBiQuantConfig().allocation == "fisher" and MoBiQuantConfig().thresholds == "balanced"
    assert MoBiQuantConfig(thresholds="layer").allocation == "band"
    assert MoBiQuantConfig.from_dict({"thresholds": "adaptive"}).allocation == "band"
    with pytest.raises(MoBiQuantError, match="balanced"):
        MoBiQuantConfig(thresholds="layer", allocation="fisher")
