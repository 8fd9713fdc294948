"""The view functions on hand-made steps and reports: no server, no model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("plotly")

from app import views  # noqa: E402
from mobiquant import TokenStep  # noqa: E402
from mobiquant.analysis import MigrationReport  # noqa: E402

LINEARS = ["self_attn.q_proj", "mlp.down_proj"]
PRECISIONS = [2, 4, 6, 8]


def step(i, k, budget=4.0, text=None, token_id=None):
    slices = torch.full((3, 2), k, dtype=torch.long) if isinstance(k, int) else torch.tensor(k)
    return TokenStep(i, token_id if token_id is not None else 100 + i, text or f"t{i}", budget, "router",
                     bits=2.0 * float(slices.float().mean()), slices=slices, linears=LINEARS, seconds=0.1, prob=0.5,
                     top=[("a", 0.5), ("b", 0.2)])


def test_colours_are_viridis_ends_and_text_stays_readable():
    assert views.slice_color(1, 4) == "rgb(68, 1, 84)" and views.slice_color(4, 4) == "rgb(253, 231, 37)"
    assert views.text_color(views.slice_color(1, 4)) == "#fff" and views.text_color(views.slice_color(4, 4)) == "#111"
    assert views.slice_color(0, 4) == views.slice_color(1, 4) and views.slice_color(9, 4) == views.slice_color(4, 4)


def test_selection_level_by_layer_and_linear():
    s = step(0, [[1, 4], [2, 2], [3, 1]])
    assert views.selection_level(s) == pytest.approx(13 / 6)
    assert views.selection_level(s, layer=0) == pytest.approx(2.5)
    assert views.selection_level(s, linear="mlp.down_proj") == pytest.approx(7 / 3)
    assert views.selection_level(s, layer=2, linear="self_attn.q_proj") == 3


def test_tokens_html_colours_escapes_and_marks_switches():
    steps = [step(0, 1, 3.0, "<b>"), step(1, 1, 3.0), step(2, 4, 8.0, "&"), step(3, 4, 8.0)]
    html = views.tokens_html(steps, PRECISIONS, mark=2)
    assert html.count('class="mq-tok') == 4 and html.count("mq-diverge") == 1
    assert "&lt;b&gt;" in html and "<b>" not in html  # model output is escaped
    assert html.count('class="mq-switch"') == 1 and "⇢ 8 b" in html
    assert f"background:{views.slice_color(1, 4)}" in html and f"background:{views.slice_color(4, 4)}" in html
    assert "generated tokens appear here" in views.tokens_html([], PRECISIONS)


def test_trace_rows_and_legend():
    rows = views.trace_rows([step(0, 2), step(1, 3)], layer=1)
    assert [r["slices"] for r in rows] == [2, 3] and rows[1]["bits"] == 6.0
    legend = views.legend_html(PRECISIONS)
    assert legend.count("mq-swatch") == 4 and "4 slices · 8 b" in legend


def test_heatmap_and_series_figures():
    steps = [step(i, 1 + i % 4) for i in range(6)]
    fig = views.heatmap_figure(steps, PRECISIONS, "mlp.down_proj")
    z = fig.data[0].z
    assert len(z) == 3 and len(z[0]) == 6 and z[0][3] == 4 and fig.data[0].zmax == 4
    series = views.series_figure(steps)
    assert [t.name for t in series.data] == ["tokens/s", "realized bits", "budget"]
    assert series.data[0].y[0] is None and series.data[0].y[1] == pytest.approx(10.0)
    assert len(views.heatmap_figure([], PRECISIONS).data) == 0


def test_live_plot_json_is_what_plotly_validation_gives():
    """The live plots are sent as plotly JSON built without plotly's validation (fast): validating that JSON must
    change nothing, and the template must be plotly_white, untouched by the figures built from it."""
    import json

    import plotly.graph_objects as go
    import plotly.io as pio

    steps = [step(i, 1 + i % 4, budget=4.0 if i < 3 else 6.0) for i in range(6)]
    steps[4].seconds = 0.0  # no rate for this one (None in the series)
    specs = [views.heatmap_spec(steps, PRECISIONS), views.heatmap_spec(steps, PRECISIONS, "mlp.down_proj"),
             views.heatmap_spec([], PRECISIONS), views.series_spec(steps), views.series_spec([])]
    for spec in specs:
        assert json.loads(views.figure_json(spec)) == json.loads(go.Figure(spec).to_json())
    old_way = go.Figure()
    old_way.update_layout(template="plotly_white")  # what the figures set before
    assert json.loads(views.figure_json(specs[0]))["layout"]["template"] == json.loads(old_way.to_json())["layout"][
        "template"]
    assert views._template() == pio.templates["plotly_white"].to_plotly_json()


def test_outlier_figures_mark_each_precisions_top_tokens():
    T = 20
    errors = {"2 bits": torch.arange(T, 0, -1).float(), "8 bits": torch.arange(T).float()}
    top = {k: v.topk(2).indices for k, v in errors.items()}
    rep = MigrationReport("model.layers.0.mlp.down_proj", list(range(T)), torch.rand(T), errors, top,
                          torch.tensor([[1.0, 0.0], [0.0, 1.0]]), list(errors), {})
    fig, jac = views.outlier_figures(rep, [f"w{i}" for i in range(T)])
    markers = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert [list(m.x) for m in markers] == [[0, 1], [18, 19]]
    assert jac.data[0].z[0][1] == 0.0 and list(jac.data[0].x) == ["2 bits", "8 bits"]


def test_first_divergence_and_summary():
    a = [step(i, 1, token_id=i) for i in range(5)]
    b = [step(i, 4, token_id=i if i < 3 else 99) for i in range(5)]
    assert views.first_divergence(a, b) == 3 and views.first_divergence(a, a[:2]) is None
    assert 'data-diverge="3"' in views.compare_summary(a, b, 2, 8)


def test_metrics_html_formats_missing_values():
    html = views.metrics_html({"state": "generating", "device": "cpu", "tokens": 3, "tokens_per_s": 12.345,
                               "bytes_per_token": 2**21, "memory": {"process RSS": 1024.4}})
    assert 'data-state="generating"' in html and "12.3" in html and "2.0 MiB" in html and "1,024 MiB" in html
    assert "–" in html  # ms/token not known yet
