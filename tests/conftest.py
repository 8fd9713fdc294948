"""Shared fixtures: tiny random LLaMA-family models built from configs (no downloads) and the embedded model."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on a CPU host (set before triton's import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["MOBIQUANT_CACHE"] = tempfile.mkdtemp(prefix="mobiquant-test-cache-")  # never the user's cache


def _tiny(family: str, tie: bool = False):
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v carry a bias
    }[family]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**common)).eval()


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def tiny_model(request):
    return _tiny(request.param)


@pytest.fixture
def tiny_llama():
    return _tiny("llama", tie=True)


@pytest.fixture
def tiny_qwen2():
    return _tiny("qwen2")


def save_tiny_model_dir(model, path):
    """A local HF model directory: the model plus a word-level tokenizer over its 96 ids ("w0" .. "w94")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tiny_llama, tmp_path):
    return save_tiny_model_dir(tiny_llama, tmp_path / "tiny")


@pytest.fixture
def tiny_text(tmp_path):
    """A text of 400 words of the tiny vocabulary, with some structure so that perplexity is meaningful."""
    g = torch.Generator().manual_seed(0)
    words = [f"w{int(i) % 95}" for i in torch.randint(0, 20, (400,), generator=g)]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words) + "\n")
    return path


def _routed_model(model, hidden=8, group_size=32):
    """quantize_ + untrained routers whose calibration scores come from the model's own activations on random
    tokens (what calibrate_ leaves behind, without the training), for plumbing tests."""
    import mobiquant
    from mobiquant import MoBiQuantConfig, quantize_
    from mobiquant.nn.router import MoBiRoute
    from mobiquant.route import attach_thresholds_

    quantize_(model, MoBiQuantConfig(group_size=group_size))
    linears = mobiquant.quantized_linears(model)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (8, 64)))
    for h in hooks:
        h.remove()
    for n, m in linears.items():
        m.router = MoBiRoute(m.in_features, m.num_slices, hidden)
        m.router.set_calibration_scores_(m.router(inputs[n]).detach())
    attach_thresholds_(model)
    return model


@pytest.fixture
def routed_model():
    return _routed_model


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per test session (~20 s)."""
    from mobiquant.models import load_model

    return load_model("default")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
