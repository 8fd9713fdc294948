import pytest
import torch
from torch import nn

import mobiquant
from mobiquant import MoBiQuantConfig, MoBiQuantError, MoBiQuantLinear, precision, quantize_


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sqnr(ref, x):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()).item()


def test_quantize_llama_family(tiny_model):
    """LLaMA, Mistral and Qwen2 (q/k/v with bias) shapes: every decoder linear sliced, outputs converge with k."""
    ids = torch.randint(0, 96, (2, 16))
    ref = logits(tiny_model, ids)
    emb, head = tiny_model.model.embed_tokens.weight.clone(), tiny_model.lm_head.weight.clone()
    quantize_(tiny_model, MoBiQuantConfig(group_size=32))
    q = mobiquant.quantized_linears(tiny_model)
    assert len(q) == 2 * 7 and all(isinstance(m, MoBiQuantLinear) for m in q.values())
    assert isinstance(tiny_model.lm_head, nn.Linear) and torch.equal(tiny_model.lm_head.weight, head)
    assert torch.equal(tiny_model.model.embed_tokens.weight, emb)
    scores = []
    for k in range(1, 5):
        with precision(k=k):
            scores.append(sqnr(ref, logits(tiny_model, ids)))
    assert all(b > a for a, b in zip(scores, scores[1:])) and scores[-1] > 30, scores


def test_per_token_k_through_the_model(tiny_llama):
    quantize_(tiny_llama, MoBiQuantConfig(group_size=32))
    ids = torch.randint(0, 96, (1, 12))
    with precision(k=torch.full((1, 12), 3)):
        y_tensor = logits(tiny_llama, ids)
    with precision(k=3):
        y_int = logits(tiny_llama, ids)
    torch.testing.assert_close(y_tensor, y_int)


def test_auto_group_size_per_layer(tiny_llama):
    quantize_(tiny_llama)  # widths 64 and 128: groups 64 and 128
    gs = {m.in_features: m.group_size for m in mobiquant.quantized_linears(tiny_llama).values()}
    assert gs == {64: 64, 128: 128}


def test_module_patterns(tiny_llama):
    quantize_(tiny_llama, MoBiQuantConfig(group_size=32, modules=("*.mlp.*",)))
    names = set(mobiquant.quantized_linears(tiny_llama))
    assert len(names) == 6 and all(".mlp." in n for n in names)


def test_bad_group_leaves_model_untouched(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    with pytest.raises(MoBiQuantError, match="does not divide"):
        quantize_(tiny_llama, MoBiQuantConfig(group_size=48))
    assert not mobiquant.quantized_linears(tiny_llama)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_model_without_linears():
    model = nn.Sequential(nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)]))
    with pytest.raises(MoBiQuantError, match="no nn.Linear"):
        quantize_(model)
    with pytest.raises(MoBiQuantError, match="no decoder blocks"):
        quantize_(nn.Sequential(nn.Linear(8, 8)))


def test_no_module_matches(tiny_llama):
    with pytest.raises(MoBiQuantError, match="matching"):
        quantize_(tiny_llama, MoBiQuantConfig(modules=("*.nothing",)))
