"""The MLflow UI that ``dmgl ui`` serves, in a real browser: the printed link opens the experiment's runs table, the
parent run holds its seeds, and a seed's metric charts draw alpha.

Playwright (PyPI, the dev extra) drives the system's Chromium (Debian's ``chromium`` package) through
``executable_path``: Playwright's own browser download is not used. Screenshots go to bench/out/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from test_ui import UiProcess, free_port

from dmgl_cli import links

pytestmark = pytest.mark.integration

SCREENSHOTS = Path(__file__).resolve().parents[1] / "bench" / "out" / "screenshots"
# 3 epochs keep the test short; docs/screenshots/ were taken with DMGL_BROWSER_EPOCHS=20, the recipe's own.
EPOCHS = os.environ.get("DMGL_BROWSER_EPOCHS", "3")
# Milliseconds for each step in the browser: the first page load compiles MLflow's large bundle.
STEP = 60_000


def chromium() -> str | None:
    """``$DMGL_CHROMIUM``, else a Chromium on PATH."""
    explicit = os.environ.get("DMGL_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    executable = chromium()
    if executable is None:
        pytest.skip(
            "no Chromium binary found: apt-get install chromium, or point DMGL_CHROMIUM at one "
            f"(DMGL_CHROMIUM={os.environ.get('DMGL_CHROMIUM', '')!r})"
        )
    with sync_api.sync_playwright() as playwright:
        # No sandbox: CI runs as root, where Chromium's sandbox refuses to start; /dev/shm may be tiny in containers.
        launched = playwright.chromium.launch(
            executable_path=executable, chromium_sandbox=False, args=["--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def demo_runs(run_cli, registry):
    """A registry as `make demo` leaves it (fewer epochs): the parent run and its three seed runs."""
    from dmgl_cli.tracking import Tracker

    run_cli("prepare", "synthetic", "--silent")
    run_cli("train", "--recipe", "synthetic", "--strategy", "lb", "--seeds", "3", "--epochs", EPOCHS)
    tracker = Tracker()
    (experiment_id,) = tracker.experiments(["synthetic"])
    runs = tracker.search([experiment_id])
    parent = next(r for r in runs if r.role == "parent")
    seeds = sorted((r for r in runs if r.parent_id == parent.run_id), key=lambda r: r.name)
    assert len(seeds) == 3
    return experiment_id, parent, seeds


def run_path(experiment_id: str, run_id: str) -> str:
    """The part of links.run_url after the address and before the view: the run page's route in the UI."""
    return links.run_url("", experiment_id, run_id).split("?")[0].lstrip("/")


# `browser` first: without a Chromium the test is skipped before any training.
def test_the_printed_link_shows_the_runs_and_the_alpha_chart(browser, demo_runs):
    experiment_id, parent, seeds = demo_runs
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = UiProcess("--port", str(port))
    try:
        line = ui.wait_for_link()
        link = re.search(r"http://\S+", line)
        assert link, line
        base = f"http://127.0.0.1:{port}"
        assert link.group(0) == links.experiment_runs_url(base, experiment_id)

        page = browser.new_page(viewport={"width": 1280, "height": 560})
        page.set_default_timeout(STEP)
        page.goto(link.group(0))

        # The runs table: the parent run, whose seeds appear nested under it once it is expanded.
        parent_link = page.locator(f'a[href="{run_path(experiment_id, parent.run_id)}"]')
        parent_link.wait_for()
        assert parent_link.inner_text().strip() == parent.name
        seed_links = [page.locator(f'a[href="{run_path(experiment_id, seed.run_id)}"]') for seed in seeds]
        assert all(seed_link.count() == 0 for seed_link in seed_links), "seed runs listed beside their parent"
        close_assistant(page)
        page.get_by_role("gridcell").filter(has=parent_link).get_by_role("button").click()
        for seed, seed_link in zip(seeds, seed_links, strict=True):
            seed_link.wait_for()
            assert seed_link.inner_text().strip() == seed.name
        page.mouse.move(640, 540)  # away from the table: no hover highlight in the picture
        page.wait_for_timeout(500)  # let the expanded rows settle before the picture
        page.screenshot(path=str(SCREENSHOTS / "runs-table.png"))

        # A seed's page is where the table links to, and its "Model metrics" tab draws the alpha chart.
        seed = seeds[0]
        seed_links[0].click()
        page.wait_for_url(re.compile(re.escape(run_path(experiment_id, seed.run_id)) + r"(\?|/|$)"))
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(links.run_metrics_url(base, experiment_id, seed.run_id))
        chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(
            has=page.locator('h4[title="alpha/value"]')
        )
        chart.wait_for()
        line_path = chart.locator(".js-plotly-plot g.trace path.js-line").first
        line_path.wait_for()
        drawn = line_path.get_attribute("d") or ""
        assert drawn.count("L") >= 2, f"the alpha line has fewer than 3 points (epochs): {drawn!r}"
        assert f"{seed.name} (alpha/value)" in chart.inner_text()
        page.mouse.move(1270, 890)  # away from the charts: no plot toolbar in the picture
        page.wait_for_timeout(500)
        # The picture: the "alpha" section of the charts, its heading and its charts.
        heading = (
            page.get_by_test_id("experiment-view-compare-runs-section-header")
            .filter(has=page.get_by_text("alpha", exact=True))
            .bounding_box()
        )
        cards = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=page.locator('h4[title^="alpha/"]'))
        boxes = [box for box in (card.bounding_box() for card in cards.all()) if box]
        assert heading and boxes
        left, top = min(b["x"] for b in boxes) - 12, heading["y"] - 12
        right, bottom = max(b["x"] + b["width"] for b in boxes) + 12, max(b["y"] + b["height"] for b in boxes) + 12
        page.screenshot(
            path=str(SCREENSHOTS / "alpha-chart.png"),
            clip={"x": left, "y": top, "width": right - left, "height": bottom - top},
        )
    finally:
        ui.kill()


def close_assistant(page) -> None:
    """MLflow 3.17 opens its "MLflow Assistant" side panel on first visit; close it if it is there."""
    panel_close = page.get_by_role("button", name="Close")
    try:
        panel_close.first.click(timeout=3000)
    except Exception:  # no panel: nothing to close
        pass
