import subprocess
import sys


def test_import_is_light():
    """``import mobiquant`` pulls in no gradio, triton or transformers and does not initialise CUDA."""
    code = (
        "import sys, mobiquant, torch\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'gradio', 'triton', 'transformers', 'plotly'})\n"
        "print(heavy, torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False"


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mobiquant", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval" in out.stdout


def test_kernels_subpackage_not_top_level():
    """kernels/ is installed as mobiquant.kernels, never as a top-level `kernels` (a PyPI name)."""
    import importlib.util

    assert importlib.util.find_spec("mobiquant.kernels") is not None
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "mobiquant" not in str(spec.origin)
