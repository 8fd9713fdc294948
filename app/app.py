"""The Gradio layout and its event handlers. Views are in views.py, per-session state in session.py.

    demo = build_demo(load_served(...))
    demo.queue(...).launch(...)          # see serve()

API (``gradio_client``): /generate (streams), /set_budget, /set_mode, /stop, /recolor, /outliers, /compare.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import gradio as gr
import torch
from gradio.components.plot import PlotData

from mobiquant import (
    BudgetControl,
    MoBiQuantError,
    budget_range,
    elastic_generate,
    outlier_migration,
    quantized_linears,
)
from mobiquant.precision import check_budget
from mobiquant.trace import split_name

from . import views
from .loader import Served
from .metrics import Meter, WeightBytes
from .session import Limits, Run, Sessions, check_count, check_mode, check_prompt, check_sampling
from .stream import batches

log = logging.getLogger("mobiquant.app")
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the repo's assets/, or mobiquant/assets in a wheel
PLOT_EVERY_S = 2.0  # plots are resent at most this often while streaming
TEXT_EVERY_S = 0.1  # text and metrics at most this often (the first token at once): 10 updates/s reads as live,
# and a 2-core CPU then spends its time decoding rather than serialising one update per token (stream.py)
ALL_LAYERS = "all layers"
SWITCH_INTERVAL_S = 5e-5  # the server's GIL switch interval (serve())
QUEUE_POLL_S = 0.01  # how often the queue looks for a new request (serve())


def _examples() -> list[str]:
    path = ASSETS / "prompts.json"
    return json.loads(path.read_text())["prompts"] if path.is_file() else []


def _outlier_text() -> str:
    path = ASSETS / "outlier_text.txt"
    return path.read_text() if path.is_file() else ""


def _plot(spec: dict) -> PlotData:
    """A views.*_spec as what gr.Plot sends (its postprocess passes PlotData through): plotly JSON, no plotly figure
    built and validated on the server (views.py)."""
    return PlotData(type="plotly", plot=views.figure_json(spec))


def _user_error(e: Exception) -> gr.Error:
    """A MoBiQuantError is the user's to fix: its message as is. Anything else is logged with its traceback and
    shown briefly; the server stays up."""
    if isinstance(e, MoBiQuantError):
        return gr.Error(str(e))
    log.error("request failed:\n%s", traceback.format_exc())
    return gr.Error(f"internal error ({type(e).__name__}: {e}); the server is still running")


def build_demo(served: Served, limits: Limits | None = None) -> gr.Blocks:
    limits = limits or Limits()
    model, tok = served.model, served.tokenizer
    low, high = budget_range(model)
    linears = quantized_linears(model)
    first = next(iter(linears.values()))
    precisions = first.precisions
    leaves = sorted({split_name(n)[1] for n in linears}, key=lambda s: s.rsplit(".", 1)[-1])
    n_layers = 1 + max(split_name(n)[0] for n in linears)
    weight_bytes = WeightBytes(model)
    sessions = Sessions(limits.max_sessions)
    device = served.device
    kernels = device.type == "cuda"
    default_linear = next((n for n in linears if n.endswith("layers.1.self_attn.q_proj")), next(iter(linears)))

    def parse_view(layer, linear) -> tuple[int | None, str | None]:
        if layer in (None, ALL_LAYERS):
            li = None
        else:
            li = check_count(int(str(layer).split()[-1]) if isinstance(layer, str) else layer, 0, n_layers - 1,
                             "layer")
        if linear in (None, views.ALL):
            return li, None
        if linear not in leaves:
            raise MoBiQuantError(f"unknown linear {linear!r}; use one of {', '.join(leaves)}")
        return li, linear

    # ------------------------------------------------------------------ generate
    def generate(prompt, budget, max_new, sampling, temperature, top_p, seed, mode, layer, linear,
                 request: gr.Request):
        try:
            prompt = check_prompt(prompt, limits)
            budget = check_budget(budget, low, high)
            max_new = check_count(max_new, 1, limits.max_new_tokens, "max new tokens")
            temperature, top_p = check_sampling(temperature, top_p)
            seed = check_count(seed, 0, 2**31 - 1, "seed")
            mode = check_mode(mode)
            view = parse_view(layer, linear)
        except MoBiQuantError as e:
            raise gr.Error(str(e)) from None
        run = sessions.start(request.session_hash, Run(BudgetControl(budget, mode), Meter(weight_bytes, device)))
        run.view = view
        steps = batches(lambda: elastic_generate(model, tok, prompt, run.control, max_new,
                                                 temperature=temperature if sampling else 0, top_p=top_p, seed=seed,
                                                 max_prompt_tokens=limits.max_prompt_tokens),
                        run.control, TEXT_EVERY_S)
        last_plot, spans, spans_view, heat, series_ = 0.0, [], run.view, None, None
        try:
            for batch in steps:
                for step in batch:
                    run.steps.append(step)
                    metrics = run.meter.update(step)
                if run.view != spans_view:  # recoloured meanwhile: render every token again, once
                    spans, spans_view = [], run.view
                for i in range(len(spans), len(run.steps)):  # each token is rendered once
                    spans.append(views.token_span(run.steps[i], run.steps[i - 1] if i else None, precisions,
                                                  *spans_view))
                text = views.text_html(spans)
                now = time.perf_counter()
                if now - last_plot >= PLOT_EVERY_S:
                    last_plot = now
                    heat, series_ = _plot(views.heatmap_spec(run.steps, precisions, run.view[1])), _plot(
                        views.series_spec(run.steps))
                    yield text, heat, views.metrics_html(metrics), series_, views.trace_rows(run.steps, *run.view)
                else:
                    # Between redraws the plots are sent again as the same PlotData: gradio passes it through and
                    # its stream diff finds nothing to send (the page redraws them only every 2 s: a MutationObserver
                    # on the plots, Chromium). A gr.skip() costs more (gradio 6 rebuilds the component
                    # and its config, a pydantic JSON schema, for every skip: 4.6 ms for three against 1.5 ms per
                    # update). The trace stays a skip: resending it costs O(tokens) (3 ms more at 512 tokens).
                    yield text, heat, views.metrics_html(metrics), series_, gr.skip()
        except Exception as e:  # every failure becomes a message; the server stays up
            raise _user_error(e) from None
        state = "stopped" if run.control.stop else "done"
        yield (views.tokens_html(run.steps, precisions, *run.view),
               _plot(views.heatmap_spec(run.steps, precisions, run.view[1])),
               views.metrics_html(run.meter.snapshot(state)), _plot(views.series_spec(run.steps)),
               views.trace_rows(run.steps, *run.view))

    def set_budget(budget, request: gr.Request):
        try:
            budget = check_budget(budget, low, high)
        except MoBiQuantError as e:
            raise gr.Error(str(e)) from None
        run = sessions.get(request.session_hash)
        if run is not None:
            run.control.budget = budget  # read by the running generation before its next token
        return None

    def set_mode(mode, request: gr.Request):
        try:
            mode = check_mode(mode)
        except MoBiQuantError as e:
            raise gr.Error(str(e)) from None
        run = sessions.get(request.session_hash)
        if run is not None:
            run.control.mode = mode
        return None

    def stop(request: gr.Request):
        run = sessions.get(request.session_hash)
        if run is not None:
            run.control.stop = True
        return None

    def recolor(layer, linear, request: gr.Request):
        try:
            view = parse_view(layer, linear)
        except MoBiQuantError as e:
            raise gr.Error(str(e)) from None
        run = sessions.get(request.session_hash)
        steps = run.steps if run is not None else []
        if run is not None:
            run.view = view
        return (views.tokens_html(steps, precisions, *view), _plot(views.heatmap_spec(steps, precisions, view[1])),
                views.trace_rows(steps, *view))

    # ------------------------------------------------------------------ outliers
    def outliers(text, linear, budget):
        try:
            text = check_prompt(text, limits, "text")
            budget = check_budget(budget, low, high)
            if linear not in linears:
                raise MoBiQuantError(f"unknown linear {linear!r}")
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if ids.numel() > limits.max_outlier_tokens:
                raise MoBiQuantError(f"the text has {ids.numel()} tokens; the outlier view takes at most "
                                     f"{limits.max_outlier_tokens}")
            if ids.numel() < 10:
                raise MoBiQuantError("the text needs at least 10 tokens for a top-10 % set")
            report = outlier_migration(model, linear, ids, served.fp_weight(linear), budgets=(budget,))
        except Exception as e:
            raise _user_error(e) from None
        pieces = [tok.decode([int(i)]) for i in ids]
        fig, jac = views.outlier_figures(report, pieces)
        low_pair = min(((a, b) for a in range(len(report.labels)) for b in range(a)),
                       key=lambda p: float(report.jaccard[p[0], p[1]]))
        summary = (f'<div class="mq-outlier-summary" data-testid="mq-outlier-summary">{ids.numel()} tokens through '
                   f"<b>{linear}</b>. Lowest overlap of the top-10 % error tokens: "
                   f"{report.labels[low_pair[1]]} vs {report.labels[low_pair[0]]} = "
                   f"{float(report.jaccard[low_pair[0], low_pair[1]]):.2f} (1 = the same tokens).</div>")
        return summary, fig, jac

    # ------------------------------------------------------------------ compare
    def compare(prompt, budget_a, budget_b, max_new, seed, sampling, request: gr.Request):
        try:
            prompt = check_prompt(prompt, limits)
            budget_a, budget_b = check_budget(budget_a, low, high), check_budget(budget_b, low, high)
            max_new = check_count(max_new, 1, limits.max_compare_tokens, "max new tokens")
            seed = check_count(seed, 0, 2**31 - 1, "seed")
        except MoBiQuantError as e:
            raise gr.Error(str(e)) from None
        temperature = 0.8 if sampling else 0.0
        runs = [Run(BudgetControl(b, "router"), Meter(weight_bytes, device)) for b in (budget_a, budget_b)]
        sessions.start(request.session_hash, runs[0])  # Stop ends run A; B follows A's flag below
        gens = [iter(elastic_generate(model, tok, prompt, r.control, max_new, temperature=temperature, seed=seed,
                                      max_prompt_tokens=limits.max_prompt_tokens)) for r in runs]
        live = [True, True]
        try:
            while any(live) and not runs[0].control.stop:
                for j, g in enumerate(gens):
                    if live[j]:
                        step = next(g, None)
                        if step is None:
                            live[j] = False
                        else:
                            runs[j].steps.append(step)
                a, b = runs[0].steps, runs[1].steps
                d = views.first_divergence(a, b)
                yield (views.compare_summary(a, b, budget_a, budget_b), views.tokens_html(a, precisions, mark=d),
                       views.tokens_html(b, precisions, mark=d))
        except Exception as e:
            raise _user_error(e) from None

    # ------------------------------------------------------------------ layout
    mid = round(((low + high) / 2) * 4) / 4
    examples = _examples() or ["Explain in three sentences why the sky is blue."]  # read once
    title = f"{getattr(model.config, 'mobiquant_source', None) or model.config.name_or_path}"
    with gr.Blocks(title="mobiquant playground", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# mobiquant playground\n"
            f"**{title}**, slices {tuple(first.slice_bits)} → {low:g}–{high:g} bits per weight, one calibration. "
            f"Move the **bit budget** while the text streams: each token is coloured by how many slices the routers "
            f"gave it. Device: **{device.type}**{' (Triton kernels)' if kernels else ''}."
            + (f" Checkpoint: `{served.checkpoint}`." if served.checkpoint else ""))
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=3, max_length=limits.max_prompt_chars,
                                        value=examples[0])
                    with gr.Row():
                        go_btn = gr.Button("Generate", variant="primary", elem_id="mq-generate")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="mq-stop")
                    gr.Examples([[p] for p in examples], inputs=[prompt], label="Examples")
                    with gr.Accordion("Sampling", open=False):
                        max_new = gr.Slider(1, limits.max_new_tokens, value=min(96, limits.max_new_tokens), step=1,
                                            label="Max new tokens")
                        sampling = gr.Checkbox(False, label="Sample (off: greedy)")
                        temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                        seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                with gr.Column(scale=2):
                    budget = gr.Slider(low, high, value=mid, step=0.25, label="Bit budget",
                                       info="average bits per weight; applies from the next token", elem_id="mq-budget")
                    mode = gr.Radio(["router", "uniform", "random"], value="router", label="Mode",
                                    info="router: per-token slices; uniform: every token at the budget's precision; "
                                         "random: the baseline")
                    with gr.Row():
                        layer = gr.Dropdown([ALL_LAYERS] + [f"layer {i}" for i in range(n_layers)], value=ALL_LAYERS,
                                            label="Colour by layer")
                        linear = gr.Dropdown([views.ALL] + leaves, value=views.ALL, label="Colour by linear")
                    gr.HTML(views.legend_html(precisions))
            text = gr.HTML(views.tokens_html([], precisions), elem_id="mq-text-box")
            with gr.Row():
                idle = views.metrics_html({"state": "idle", "device": device.type})
                metrics = gr.HTML(idle, elem_id="mq-metrics-box")
                series = gr.Plot(_plot(views.series_spec([])), label="Speed and bits", elem_id="mq-series")
            heatmap = gr.Plot(_plot(views.heatmap_spec([], precisions)), label="Router heatmap", elem_id="mq-heatmap")
            with gr.Accordion("Routing trace (per token)", open=False):
                trace = gr.JSON(label="trace")
        with gr.Tab("Outliers"):
            gr.Markdown("Per-token activation absmax and output error of one linear at every precision on your own "
                        "text. The top-10 % worst tokens change with precision: **outlier migration**.")
            with gr.Row():
                out_text = gr.Textbox(_outlier_text(), lines=4, label="Text", scale=3)
                with gr.Column(scale=1):
                    out_linear = gr.Dropdown(list(linears), value=default_linear, label="Linear")
                    out_budget = gr.Slider(low, high, value=mid, step=0.25, label="Routed budget")
                    out_btn = gr.Button("Analyze", variant="primary", elem_id="mq-analyze")
            out_summary = gr.HTML()
            out_fig = gr.Plot(label="Errors across precisions", elem_id="mq-outlier-plot")
            out_jac = gr.Plot(label="Overlap", elem_id="mq-overlap-plot")
        with gr.Tab("Compare"):
            gr.Markdown("The same prompt and seed at two budgets, side by side; the first differing token is outlined.")
            with gr.Row():
                cmp_prompt = gr.Textbox(examples[0], label="Prompt", scale=3)
                with gr.Column(scale=2):
                    cmp_a = gr.Slider(low, high, value=low + 1 if low + 1 <= high else low, step=0.25, label="Budget A")
                    cmp_b = gr.Slider(low, high, value=high, step=0.25, label="Budget B")
                    cmp_new = gr.Slider(1, limits.max_compare_tokens, value=min(48, limits.max_compare_tokens),
                                        step=1, label="Max new tokens")
                    cmp_seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                    cmp_sampling = gr.Checkbox(False, label="Sample (T = 0.8)")
                    cmp_btn = gr.Button("Compare", variant="primary", elem_id="mq-compare")
            cmp_summary = gr.HTML()
            with gr.Row():
                cmp_text_a = gr.HTML(label="A")
                cmp_text_b = gr.HTML(label="B")

        model_events = dict(concurrency_id="model", concurrency_limit=limits.concurrency)
        go_btn.click(generate, [prompt, budget, max_new, sampling, temperature, top_p, seed, mode, layer, linear],
                     [text, heatmap, metrics, series, trace], api_name="generate", show_progress="minimal",
                     **model_events)
        quick = dict(queue=False, show_progress="hidden")
        budget.change(set_budget, [budget], None, api_name="set_budget", **quick)
        mode.change(set_mode, [mode], None, api_name="set_mode", **quick)
        stop_btn.click(stop, None, None, api_name="stop", **quick)
        for dd in (layer, linear):
            dd.change(recolor, [layer, linear], [text, heatmap, trace], api_name="recolor" if dd is layer else False,
                      **quick)
        out_btn.click(outliers, [out_text, out_linear, out_budget], [out_summary, out_fig, out_jac],
                      api_name="outliers", **model_events)
        cmp_btn.click(compare, [cmp_prompt, cmp_a, cmp_b, cmp_new, cmp_seed, cmp_sampling],
                      [cmp_summary, cmp_text_a, cmp_text_b], api_name="compare", **model_events)

        def forget(request: gr.Request):  # the tab closed: stop its generation, drop its state
            sessions.drop(request.session_hash)

        demo.unload(forget)
    demo.mobiquant_sessions = sessions
    return demo


def serve(served: Served, host: str = "127.0.0.1", port: int = 7860, limits: Limits | None = None,
          block: bool = True):
    """Queue with size and concurrency limits, localhost, no share link, no file access, monitoring off."""
    limits = limits or Limits()
    if served.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave one core to the server and the browser: on the 2-core CPU, 1 decode thread streams at a median of
        # 11.6 tok/s against 9.4 with 2 threads fighting the server for both (benchmarks/app_cpu.py)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
    # A decode step is ~2,000 small torch ops, each giving the GIL up and taking it back. While the server or the
    # renderer runs Python, a thread asking for the GIL waits for the holder's switch interval (5 ms by default):
    # the decode thread then crawls. 50 µs lets it back in at once (a busy Python thread beside a stream of small
    # matrix products: 3.2 s at 5 ms, 0.41 s at 50 µs, 0.33 s alone; /tmp script, this 2-core VM).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    demo = build_demo(served, limits)
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    # gradio's queue loop polls for new events every 1 ms (Queue.sleep_when_free): 1,000 event-loop wake-ups a
    # second, each taking the GIL from the decode thread, the largest part of the server's GIL time while a client
    # streams (py-spy --gil). Every 10 ms is plenty for a request to start.
    if hasattr(demo._queue, "sleep_when_free"):
        demo._queue.sleep_when_free = max(demo._queue.sleep_when_free, QUEUE_POLL_S)
    css = (ASSETS / "app.css").read_text() if (ASSETS / "app.css").is_file() else None
    demo.launch(server_name=host, server_port=port, share=False, css=css, max_file_size="1mb",
                enable_monitoring=False, show_error=True, prevent_thread_lock=not block, footer_links=["api"])
    return demo
