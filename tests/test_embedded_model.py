"""The embedded SmolLM2-135M-Instruct end to end (loaded once, ~20 s): real weights, real tokenizer."""

import copy
from pathlib import Path

import pytest

import mobiquant
import mobiquant.cli
from mobiquant import MoBiQuantConfig, precision, quantize_
from mobiquant.evaluate import make_windows, perplexity, tokenize_text
from mobiquant.quant.rtn import rtn_quantize

pytestmark = pytest.mark.model
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-raw-test.txt"


@pytest.fixture(scope="module")
def windows(embedded):
    _, tok = embedded
    text = WIKITEXT.read_text()[:20_000] if WIKITEXT.exists() else "The quick brown fox jumps over the lazy dog. " * 400
    return make_windows(tokenize_text(tok, text), 256, 2)


def test_embedded_model_shapes(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert tok.decode(tok("Hello world")["input_ids"]).strip() == "Hello world"


def test_rtn_4bit_group32_reproduces_the_q4_1_weights(embedded):
    """The GGUF is Q4_1 (blocks of 32): 4-bit RTN with group 32 gives back its weights (why the README uses g64)."""
    model, _ = embedded
    W = model.model.layers[3].mlp.down_proj.weight.detach()
    Wq = rtn_quantize(W, 4, 32)
    assert (Wq - W).abs().max() < 1e-3 * W.abs().max()


def test_slices_converge_to_full_precision(embedded, windows):
    model, _ = embedded
    fp = perplexity(model, windows)[0]
    q = quantize_(copy.deepcopy(model), MoBiQuantConfig(group_size=64))
    ppl = []
    for k in range(1, 5):
        with precision(k=k):
            ppl.append(perplexity(q, windows)[0])
    assert all(b < a for a, b in zip(ppl, ppl[1:])), ppl  # perplexity falls with every slice
    assert abs(ppl[-1] / fp - 1) < 0.01, (ppl, fp)  # 8 bits within 1 % of full precision
    assert ppl[1] < 2 * fp  # 4 bits usable


def test_cli_text_shorter_than_a_window(embedded, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mobiquant.models, "load_model", lambda *a, **k: embedded)
    (tmp_path / "short.txt").write_text("Only a few words here.")
    code = mobiquant.cli.main(["eval", "--text", str(tmp_path / "short.txt"), "--seqlen", "1024"])
    err = capsys.readouterr().err
    assert code == 2 and "fewer than one window of seqlen=1024" in err


def test_cli_bad_group_size_on_the_real_widths(embedded, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mobiquant.models, "load_model", lambda *a, **k: (copy.deepcopy(embedded[0]), embedded[1]))
    (tmp_path / "t.txt").write_text("word " * 3000)
    code = mobiquant.cli.main(["eval", "--text", str(tmp_path / "t.txt"), "--seqlen", "128", "--windows", "1",
                               "--group-size", "128", "--methods", "slices", "--bits", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "group_size 128 does not divide in_features=576" in err
