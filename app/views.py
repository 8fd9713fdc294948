"""Pure view functions: generation steps, outlier reports and metrics -> HTML strings and plotly figures.

Nothing here imports gradio or touches a model: every function takes plain data (``mobiquant.TokenStep``s, a
``MigrationReport``, dicts of numbers) and returns something a Gradio component displays, so the views are tested
without a server (tests/app/test_views.py).

Colours: slice counts are drawn on Viridis (perceptually uniform and colour-blind safe), 1 slice dark purple to
E slices yellow; a token's colour is the mean slice count of the selection (all layers and linears by default, or one
layer / one linear), so a colour between two legend swatches means the layers disagreed.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Sequence

import orjson
import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale

ALL = "all"
COLORSCALE = "Viridis"
_FONT = dict(family="Inter, system-ui, sans-serif", size=12)
_STYLE = dict(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", font=_FONT,
              margin=dict(l=50, r=20, t=40, b=40), uirevision="keep")
_LAYOUT = dict(template="plotly_white", **_STYLE)


# ------------------------------------------------------------------------------------------------ colours
@functools.cache
def _palette(n: int = 256) -> list[str]:
    return sample_colorscale(COLORSCALE, [i / (n - 1) for i in range(n)])


def slice_color(level: float, num_slices: int) -> str:
    """'rgb(r, g, b)' for a (mean) slice count in [1, E] on the Viridis scale (256 steps)."""
    t = 0.0 if num_slices <= 1 else min(max((level - 1) / (num_slices - 1), 0.0), 1.0)
    return _palette()[round(t * 255)]


def text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background`` ('rgb(r, g, b)')."""
    r, g, b = (int(v) for v in background[background.index("(") + 1 : -1].split(","))
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def selection_level(step, layer: int | None = None, linear: str | None = None) -> float:
    """Mean slice count of one token over the selected layer(s) and linear(s) of ``step.slices`` (layers, linears)."""
    s = step.slices.float()
    if layer is not None:
        s = s[layer : layer + 1]
    if linear is not None and linear != ALL:
        s = s[:, step.linears.index(linear) : step.linears.index(linear) + 1]
    return float(s.mean())


# ------------------------------------------------------------------------------------------------ token text
def legend_html(precisions: Sequence[int]) -> str:
    """One swatch per slice count k = 1..E, labelled with its bits B_k."""
    E = len(precisions)
    items = []
    for k, bits in enumerate(precisions, start=1):
        bg = slice_color(k, E)
        items.append(f'<span class="mq-swatch" style="background:{bg};color:{text_color(bg)}">'
                     f'{k} slice{"s" if k > 1 else ""} · {bits} b</span>')
    return '<div class="mq-legend" data-testid="mq-legend">' + "".join(items) + "</div>"


def _tooltip(step, level: float) -> str:
    top = ", ".join(f"{t!r} {p:.2f}" for t, p in step.top[:3])  # escaped once, with the whole title
    return (f"token {step.index}: {step.text!r}\nslices (selection mean): {level:.2f}\n"
            f"realized bits: {step.bits:.2f} (budget {step.budget:g}, {step.mode})\np = {step.prob:.3f}; top: {top}")


def tokens_html(steps: Sequence, precisions: Sequence[int], layer: int | None = None, linear: str | None = None,
                mark: int | None = None) -> str:
    """The generated text, one coloured span per token with its details on hover; a marker where the budget changed
    (``⇢ 3 b``); ``mark``: index of a token to outline (the compare view's first divergence)."""
    parts = [token_span(step, steps[i - 1] if i else None, precisions, layer, linear, mark)
             for i, step in enumerate(steps)]
    return text_html(parts)


def text_html(spans: Sequence[str]) -> str:
    """The text box around already rendered ``token_span``s (the app renders each token once)."""
    body = "".join(spans) if spans else '<span class="mq-empty">generated tokens appear here</span>'
    return f'<div class="mq-text" data-testid="mq-text">{body}</div>'


def token_span(step, previous, precisions: Sequence[int], layer: int | None = None, linear: str | None = None,
               mark: int | None = None) -> str:
    """One token's coloured span, preceded by a switch marker when its budget differs from ``previous``'s."""
    switch = ""
    if previous is not None and step.budget != previous.budget:
        switch = (f'<span class="mq-switch" title="budget {previous.budget:g} → {step.budget:g} bits from token '
                  f'{step.index}">⇢ {step.budget:g} b</span>')
    level = selection_level(step, layer, linear)
    bg = slice_color(level, len(precisions))
    cls = "mq-tok mq-diverge" if mark == step.index else "mq-tok"
    return (f'{switch}<span class="{cls}" data-k="{level:.2f}" data-i="{step.index}" '
            f'style="background:{bg};color:{text_color(bg)}" title="{html.escape(_tooltip(step, level))}">'
            f"{html.escape(step.text) or '&#8203;'}</span>")


def trace_rows(steps: Sequence, layer: int | None = None, linear: str | None = None) -> list[dict]:
    """One small record per token for the JSON view and API clients: what the router decided for it."""
    return [{"i": s.index, "token": s.text, "budget": s.budget, "mode": s.mode, "bits": round(s.bits, 3),
             "slices": round(selection_level(s, layer, linear), 3), "p": round(s.prob, 4)} for s in steps]


# ------------------------------------------------------------------------------------------------ figures
# The live plots are built as plain plotly JSON, already in the form plotly's validation gives (``figure_json``;
# tests/app/test_views.py checks that validating them changes nothing): a validated go.Figure costs ~25 ms, most of it
# copying and validating the "plotly_white" template, against ~1 ms here, and the server redraws both plots every 2 s
# while the decode thread waits for the GIL.
@functools.cache
def _template() -> dict:
    """The "plotly_white" template as JSON, made once."""
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


@functools.cache
def _colorscale() -> tuple:
    """COLORSCALE as the [[position, colour], ...] list that plotly's validator turns the name into."""
    return tuple(tuple(p) for p in go.Heatmap(colorscale=COLORSCALE).colorscale)


def _layout(title: str, height: int, **extra) -> dict:
    return {"template": _template(), **_STYLE, "title": {"text": title}, "height": height, **extra}


def figure_json(spec: dict) -> str:
    """A ``heatmap_spec`` / ``series_spec`` as the JSON string a plotly figure serialises to (NaN as null, as
    plotly's orjson engine writes it)."""
    return orjson.dumps(spec).decode()


def heatmap_spec(steps: Sequence, precisions: Sequence[int], linear: str | None = None) -> dict:
    """Layers x tokens: slice count per layer (mean over linears, or one linear) for every generated token, as
    plotly JSON (``heatmap_figure`` for the figure)."""
    data = []
    if steps:
        S = torch.stack([s.slices for s in steps]).float()  # (tokens, layers, linears)
        if linear not in (None, ALL):
            S = S[:, :, steps[0].linears.index(linear)][..., None]
        z = S.mean(-1).T.tolist()  # (layers, tokens)
        data.append({
            "type": "heatmap", "z": z, "x": list(range(len(steps))), "colorscale": _colorscale(), "zmin": 1,
            "zmax": len(precisions), "customdata": [[s.text for s in steps]] * len(z),
            "hovertemplate": "layer %{y}, token %{x} (%{customdata!r})<br>slices %{z:.2f}<extra></extra>",
            "colorbar": {"title": {"text": "slices"}, "tickvals": list(range(1, len(precisions) + 1))}})
    what = "mean over linears" if linear in (None, ALL) else linear
    return {"data": data, "layout": _layout(f"Router decisions: slices per layer and token ({what})", 340,
                                            xaxis={"title": {"text": "generated token"}},
                                            yaxis={"title": {"text": "layer"}})}


def series_spec(steps: Sequence) -> dict:
    """Tokens/s (per step) and realized bits over the generation, the budget as a step line, as plotly JSON
    (``series_figure`` for the figure)."""
    data = []
    if steps:
        x = [s.index for s in steps]
        rate = [1.0 / s.seconds if s.seconds > 0 else None for s in steps]
        rate[0] = None  # the first step includes the prompt's prefill
        data = [
            {"type": "scatter", "x": x, "y": rate, "name": "tokens/s", "mode": "lines", "line": {"color": "#3b528b"}},
            {"type": "scatter", "x": x, "y": [s.bits for s in steps], "name": "realized bits", "yaxis": "y2",
             "mode": "lines", "line": {"color": "#21918c"}},
            {"type": "scatter", "x": x, "y": [s.budget for s in steps], "name": "budget", "yaxis": "y2",
             "mode": "lines", "line": {"color": "#fde725", "dash": "dot", "shape": "hv"}}]
    return {"data": data, "layout": _layout("Speed and bits per token", 260,
                                            xaxis={"title": {"text": "generated token"}},
                                            yaxis={"title": {"text": "tokens/s"}, "rangemode": "tozero"},
                                            yaxis2={"title": {"text": "bits"}, "overlaying": "y", "side": "right"},
                                            legend={"orientation": "h", "y": -0.35})}


def heatmap_figure(steps: Sequence, precisions: Sequence[int], linear: str | None = None) -> go.Figure:
    """``heatmap_spec`` as a plotly figure."""
    return go.Figure(heatmap_spec(steps, precisions, linear))


def series_figure(steps: Sequence) -> go.Figure:
    """``series_spec`` as a plotly figure."""
    return go.Figure(series_spec(steps))


def outlier_figures(report, tokens: Sequence[str]) -> tuple[go.Figure, go.Figure]:
    """(per-token view, overlap matrix) of a ``MigrationReport``: activation absmax and the output error at every
    precision with each precision's top-10 % tokens marked; the Jaccard overlap of those top sets."""
    from plotly.subplots import make_subplots

    T = len(report.absmax)
    x = list(range(T))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.06,
                        subplot_titles=("activation absmax per token (input of the linear)",
                                        "output error ||x(Ŵ - W)ᵀ||² per token (log), ● = top 10 % of that precision"))
    fig.add_trace(go.Bar(x=x, y=report.absmax.tolist(), name="absmax", marker_color="#440154", customdata=tokens,
                         hovertemplate="token %{x} %{customdata!r}<br>absmax %{y:.2f}<extra></extra>"), row=1, col=1)
    colors = sample_colorscale(COLORSCALE, [i / max(len(report.labels) - 1, 1) for i in range(len(report.labels))])
    for label, color in zip(report.labels, colors):
        err = report.errors[label].clamp_min(1e-12).tolist()
        top = sorted(report.top[label].tolist())
        dash = "dot" if label.startswith("routed") else "solid"
        fig.add_trace(go.Scatter(x=x, y=err, name=label, mode="lines", line=dict(color=color, width=1.2, dash=dash),
                                 legendgroup=label, customdata=tokens,
                                 hovertemplate=f"{label}<br>token %{{x}} %{{customdata!r}}<br>error %{{y:.3g}}"
                                               "<extra></extra>"), row=2, col=1)
        fig.add_trace(go.Scatter(x=top, y=[err[i] for i in top], mode="markers", marker=dict(color=color, size=6),
                                 legendgroup=label, showlegend=False, hoverinfo="skip"), row=2, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_layout(**_LAYOUT, height=520, title=f"Outliers across precisions: {report.linear}",
                      xaxis2_title="token", legend=dict(orientation="h", y=-0.15))
    jac = go.Figure(go.Heatmap(z=report.jaccard.tolist(), x=report.labels, y=report.labels, zmin=0, zmax=1,
                               colorscale=COLORSCALE, texttemplate="%{z:.2f}",
                               hovertemplate="%{y} vs %{x}: %{z:.2f}<extra></extra>"))
    jac.update_layout(**_LAYOUT, height=420, title="Overlap (Jaccard) of the top-10 % error tokens",
                      yaxis=dict(autorange="reversed"))
    return fig, jac


# ------------------------------------------------------------------------------------------------ metrics
def _fmt(v, unit: str = "", digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}{unit}"


def metrics_html(m: dict) -> str:
    """The live metrics panel from a dict with keys: tokens, ms_per_token, tokens_per_s, ttft_s, bits, bits_avg,
    bytes_per_token, memory (label -> MiB), device, state."""
    rows = [
        ("tokens", _fmt(m.get("tokens"), digits=0)),
        ("ms / token", _fmt(m.get("ms_per_token"))),
        ("tokens / s", _fmt(m.get("tokens_per_s"))),
        ("time to first token", _fmt(m.get("ttft_s"), " s", 2)),
        ("realized bits (last / mean)", f"{_fmt(m.get('bits'), digits=2)} / {_fmt(m.get('bits_avg'), digits=2)}"),
        ("weight bytes read / token", _fmt((m.get("bytes_per_token") or float("nan")) / 2**20, " MiB")),
    ]
    rows += [(label, _fmt(v, " MiB", 0)) for label, v in (m.get("memory") or {}).items()]
    cells = "".join(f'<tr><th>{html.escape(k)}</th><td data-metric="{html.escape(k)}">{html.escape(v)}</td></tr>'
                    for k, v in rows)
    state = html.escape(str(m.get("state", "idle")))
    device = html.escape(str(m.get("device", "")))
    return (f'<div class="mq-metrics" data-testid="mq-metrics" data-state="{state}">'
            f'<div class="mq-state">{state} · {device}</div><table>{cells}</table></div>')


def first_divergence(a: Sequence, b: Sequence) -> int | None:
    """Index of the first generated token that differs between two runs, None if one is a prefix of the other."""
    for x, y in zip(a, b):
        if x.token_id != y.token_id:
            return x.index
    return None


def compare_summary(a: Sequence, b: Sequence, budget_a: float, budget_b: float) -> str:
    d = first_divergence(a, b)
    mean = lambda steps: sum(s.bits for s in steps) / len(steps) if steps else float("nan")
    where = (f"the texts diverge at token {d}" if d is not None
             else "no divergence" + (" so far" if len(a) != len(b) else f" in {len(a)} tokens"))
    return (f'<div class="mq-compare-summary" data-testid="mq-compare-summary" data-diverge="{"" if d is None else d}">'
            f"A: budget {budget_a:g} b, realized {mean(a):.2f} b, {len(a)} tokens · "
            f"B: budget {budget_b:g} b, realized {mean(b):.2f} b, {len(b)} tokens · {where}</div>")
