"""Kernel tests run everywhere: on a CPU machine through Triton's interpreter, on a GPU host natively.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection, and only when no
CUDA device is present (a GPU host runs the compiled kernels, inline PTX included).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
