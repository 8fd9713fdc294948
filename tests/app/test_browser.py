"""The playground in a real browser (Playwright + the system Chromium): type, generate, move the budget slider during
the generation, and check that coloured tokens stream, their colours change after the move, the plots render, the
metrics update and the console stays clean. Saves a screenshot (MOBIQUANT_SCREENSHOT=path also writes it there:
that is how assets/screenshot.png is made)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(app_server, tmp_path_factory):
    sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no {CHROMIUM}: `make browser` installs it")
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1500})
        pg = context.new_page()
        pg.problems = []
        pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
        pg.on("pageerror", lambda e: pg.problems.append(str(e)))
        pg.goto(app_server, wait_until="load", timeout=60_000)
        pg.locator("#mq-generate").wait_for(timeout=60_000)
        yield pg
        browser.close()


def _colors(page) -> list[str]:
    return page.eval_on_selector_all(".mq-text .mq-tok", "els => els.map(e => e.style.background)")


def test_generate_move_slider_colors_change_plots_metrics(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_label("Prompt").first.fill("Count from 1 to 200, separated by commas.")
    page.get_by_label("uniform").check()
    budget = page.get_by_label("number input for Bit budget")
    budget.fill("2")
    budget.press("Enter")
    page.locator("#mq-generate").click()
    page.wait_for_function("document.querySelectorAll('.mq-text .mq-tok').length >= 6", timeout=90_000)
    before = len(_colors(page))
    budget.fill("8")
    budget.press("Enter")
    metrics = page.locator('[data-testid="mq-metrics"]')
    expect(metrics).to_have_attribute("data-state", "done", timeout=180_000)

    colors = _colors(page)
    assert len(colors) > before + 3, "tokens kept streaming after the move"
    assert len(set(colors[:before])) == 1  # 2 bits, uniform: every token one slice
    assert colors[-1] != colors[0]  # ... and all four slices after the move to 8 bits
    expect(page.locator(".mq-switch")).to_have_count(1)
    expect(page.locator('[data-testid="mq-legend"] .mq-swatch')).to_have_count(4)
    tokens = page.locator('[data-testid="mq-metrics"] td[data-metric="tokens"]').inner_text()
    assert int(tokens) == len(colors)
    assert page.locator('[data-testid="mq-metrics"] td[data-metric="tokens / s"]').inner_text() != "–"
    for plot in ("#mq-heatmap", "#mq-series"):  # plotly drew its SVG
        expect(page.locator(f"{plot} .js-plotly-plot .main-svg").first).to_be_visible(timeout=30_000)
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MOBIQUANT_SCREENSHOT"):
        shutil.copy(shot, os.environ["MOBIQUANT_SCREENSHOT"])
    assert page.problems == [], page.problems


def test_outlier_tab_renders_its_plots(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Outliers").click()
    page.locator("#mq-analyze").click()
    expect(page.locator('[data-testid="mq-outlier-summary"]')).to_be_visible(timeout=180_000)
    for plot in ("#mq-outlier-plot", "#mq-overlap-plot"):
        expect(page.locator(f"{plot} .js-plotly-plot .main-svg").first).to_be_visible(timeout=30_000)
    assert page.problems == [], page.problems
