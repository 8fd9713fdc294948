"""The mobiquant playground (Gradio), installed as ``mobiquant.app``; started by ``mobiquant app``.

Step 6 of the data flow (visualize). It reads only mobiquant's public API: ``elastic_generate`` and its
``TokenStep``s (the routing trace), ``budget_range``, ``outlier_migration``, ``quantized_linears``.

    loader.py   which model is served: a checkpoint, or the embedded model calibrated once (--fast) and cached
    session.py  per-session generation state (budget control, steps) and server-side limits
    metrics.py  live speed, realized bits, weight bytes per token, memory
    views.py    pure functions: steps / reports -> HTML and plotly figures (no gradio)
    app.py      the layout and the event handlers; serve()

``import mobiquant`` never imports this package (nor gradio).
"""

from .loader import Served, load_served
from .session import Limits

__all__ = ["Served", "load_served", "Limits", "build_demo", "serve"]


def __getattr__(name):  # gradio is imported only when the UI is built
    if name in ("build_demo", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
