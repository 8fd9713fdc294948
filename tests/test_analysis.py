import copy

import pytest
import torch

from mobiquant import MoBiQuantError
from mobiquant.analysis import outlier_migration

NAME = "model.layers.1.mlp.down_proj"


@pytest.fixture
def pair(tiny_llama, routed_model):
    fp = copy.deepcopy(tiny_llama)
    return routed_model(tiny_llama), fp


def test_errors_jaccard_and_routed_counts(pair):
    model, fp = pair
    ids = torch.randint(0, 96, (60,))
    rep = outlier_migration(model, NAME, ids, fp.get_submodule(NAME).weight, budgets=(3.0, 5.0))
    assert rep.labels == ["2 bits", "4 bits", "6 bits", "8 bits", "routed 3 bits", "routed 5 bits"]
    means = [rep.errors[f"{b} bits"].mean().item() for b in (2, 4, 6, 8)]
    assert all(b < a / 4 for a, b in zip(means, means[1:]))  # ~16x less squared error per 2-bit slice
    assert rep.jaccard.shape == (6, 6) and torch.allclose(rep.jaccard.diagonal(), torch.ones(6))
    assert (rep.jaccard >= 0).all() and (rep.jaccard <= 1).all() and torch.allclose(rep.jaccard, rep.jaccard.T)
    assert all(len(t) == 6 for t in rep.top.values())  # top 10 % of 60 tokens
    assert rep.absmax.shape == (60,) and (rep.absmax > 0).all()
    n = rep.counts["routed 3 bits"]
    assert n.shape == (60,) and 1 <= n.min() and n.max() <= 4
    # the routed error is the error of the precision each token got
    stacked = torch.stack([rep.errors[f"{b} bits"] for b in (2, 4, 6, 8)])
    assert torch.equal(rep.errors["routed 3 bits"], stacked.gather(0, (n - 1)[None])[0])
    assert "routed 5 bits" in rep.table()


def test_bad_arguments(pair):
    model, fp = pair
    ids = torch.randint(0, 96, (20,))
    with pytest.raises(MoBiQuantError, match="not a quantized linear"):
        outlier_migration(model, "lm_head", ids, fp.lm_head.weight)
    with pytest.raises(MoBiQuantError, match="shape"):
        outlier_migration(model, NAME, ids, torch.zeros(3, 3))
