"""mobiquant: MoBiQuant (arXiv 2602.20191), Mixture-of-Bits quantization for token-adaptive elastic LLMs.

Data flow:  load (models.py) -> slice (quant/, nn/linear.py, api.py) -> calibrate -> route -> generate -> visualize.

Glossary (../shared/docs/paper-notes.md §2):
    E        number of slices of each linear weight
    b_e      bits of slice e; B_k = b_1 + ... + b_k, the precision of the first k slices
    k        active slices of a token (1..E); "2k bits" for the default (2, 2, 2, 2)
    s_1, z_1 per-group base scale and zero point; every other scale is derived (s_k = s_1 / 2^(B_k - b_1))
    c_e, Q_k slice codes and the B_k-bit code of the first k slices, Q_k = (Q_{k-1} << b_k) + c_k
    Ŵ_k      weight reconstructed from the first k slices

    import mobiquant
    model, tok = mobiquant.load_model("default")          # embedded SmolLM2-135M-Instruct (GGUF)
    mobiquant.quantize_(model, mobiquant.MoBiQuantConfig(slice_bits=(2, 2, 2, 2), group_size=64))
    with mobiquant.precision(k=2):                          # 4 bits for every token
        logits = model(ids).logits
    mobiquant.calibrate_(fp_model, tok)                     # clipping + routers, block by block (calibrate/)
    with mobiquant.precision(budget=3.5):                   # routers pick k per token; 3.5 bits on average
        logits = fp_model(ids).logits

``import mobiquant`` imports torch only: transformers, gradio and triton are imported where they are used, and CUDA
is never initialised at import.
"""

from .api import quantize_, quantized_linears
from .config import MoBiQuantConfig
from .errors import MoBiQuantError
from .generate import BudgetControl, TokenStep, budget_range, elastic_generate
from .nn.linear import MoBiQuantLinear, set_dense_cache_
from .nn.router import MoBiRoute
from .precision import current_precision, precision
from .trace import RoutingTrace

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("models", "load_model"),
    "save_quantized": ("io", "save_quantized"),
    "load_quantized": ("io", "load_quantized"),
    "perplexity": ("evaluate", "perplexity"),
    "calibrate_": ("calibrate", "calibrate_"),
    "CalibConfig": ("calibrate", "CalibConfig"),
    "outlier_migration": ("analysis", "outlier_migration"),
}


def __getattr__(name):  # lazy: these pull in transformers
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'mobiquant' has no attribute {name!r}")


__all__ = [
    "MoBiQuantConfig", "MoBiQuantError", "MoBiQuantLinear", "quantize_", "quantized_linears", "precision",
    "current_precision", "set_dense_cache_", "load_model", "save_quantized", "load_quantized", "perplexity",
    "MoBiRoute", "RoutingTrace", "BudgetControl", "TokenStep", "elastic_generate", "budget_range", "calibrate_",
    "CalibConfig", "outlier_migration",
]
