"""optuna-dashboard and the MLflow UI as a user sees them: real servers (`hpo dashboard`, `hpo ui`) on a finished
quickstart study, pages rendered by a real headless chromium (Debian's, driven by Playwright), assertions on the
rendered text and charts. Without a browser these tests skip and say why (on CI they fail: tests/services.py).

Screenshots go to test-artifacts/; with HPO_UPDATE_SCREENSHOTS=1 the README's (DOCS_SHOTS) go to docs/ instead, so
the pictures in the README are always what this test saw: `HPO_UPDATE_SCREENSHOTS=1 pytest tests/browser`."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from tests.finished_study import QUICKSTART, REPO, Server, finished_study
from tests.services import missing

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-artifacts"
DOCS = REPO / "docs"
DOCS_SHOTS = {"dashboard-trial.png", "mlflow-runs.png", "mlflow-chart.png"}  # shown in the README
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _no_browser() -> str:
    if not CHROMIUM.exists():
        return missing(f"no browser: {CHROMIUM} is missing (as root: apt-get install -y chromium; .ci/run does this "
                       "before `make test`)")
    if importlib.util.find_spec("playwright") is None:
        return missing("no browser driver: the playwright package is missing (pip install -e '.[dev]')")
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_no_browser()), reason=_no_browser() or "browser found")]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = finished_study(tmp_path_factory)
    root = work / "runs" / "quickstart"
    loaded = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    return {"work": work, "study": loaded, "args": [str(QUICKSTART), "--run-dir", str(work / "runs")]}


@pytest.fixture(scope="module")
def servers(study: dict[str, Any]) -> Iterator[dict[str, Server]]:
    """Both servers started at once (the MLflow UI takes a while), stopped with their process groups."""
    dashboard = Server("dashboard", *study["args"], cwd=study["work"])
    ui = Server("ui", *study["args"], cwd=study["work"])
    try:
        dashboard.wait("/api/studies")
        ui.wait("/health")
        yield {"dashboard": dashboard, "ui": ui}
    finally:
        dashboard.stop()
        ui.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def shot(page: Any, name: str, full_page: bool = False) -> Path:
    """A screenshot in test-artifacts/, or for the README's pictures in docs/ when HPO_UPDATE_SCREENSHOTS=1."""
    folder = DOCS if name in DOCS_SHOTS and os.environ.get("HPO_UPDATE_SCREENSHOTS") == "1" else SHOTS
    folder.mkdir(exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000
    return path


def show_columns(page: Any, wanted: dict[str, bool]) -> None:
    """Tick (True) or untick (False) columns in the runs table's "Columns" selector."""
    page.get_by_role("button", name="Columns").click()
    tree = page.get_by_test_id("column-selector-tree")
    for name, on in wanted.items():
        page.get_by_placeholder("Search columns").fill(name)
        node = tree.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(f"^{name}$"))
        node.wait_for()  # the filtered tree is drawn after the search: read the box only once it is there
        if node.locator(".du-bois-light-tree-checkbox-checked").count() != on:
            node.click()
    page.keyboard.press("Escape")


# The curves of one metric, {run name: [x, y]} (x: the steps), from the first plotly chart on the page that holds
# that metric's curve for every named run with its expected number of points; null while none does. The page holds
# one chart per metric (each run's curves carry the metric as trace.metricKey), drawn, filtered by the chart search
# and redrawn as each run's history comes back, so neither the first chart nor the first drawing will do.
CURVES_OF_METRIC = """({metric, points}) => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    if (!plot.checkVisibility()) continue;  // a chart the search has hidden
    const curves = {};
    for (const trace of plot.data || []) {
      if (trace.metricKey === metric && trace.name in points && !(trace.name in curves)) {
        curves[trace.name] = [Array.from(trace.x), Array.from(trace.y)];
      }
    }
    const names = Object.keys(points);
    if (names.every(n => n in curves && curves[n][0].length === points[n])) return curves;
  }
  return null;
}"""

def test_dashboard_lists_the_study_with_its_trial_count(servers: dict[str, Server], study: dict, page: Any) -> None:
    base, s = servers["dashboard"].url, study["study"]
    page.goto(f"{base}/dashboard")
    page.get_by_text("quickstart").first.wait_for()
    assert "Direction: MAXIMIZE" in page.inner_text("body")
    shot(page, "dashboard-studies.png")
    page.goto(f"{base}/dashboard/studies/{s._study_id}/trials")
    page.get_by_text(f"{len(s.trials)} Trials", exact=True).wait_for()
    listed = page.inner_text("body")
    for t in s.trials:
        assert f"Trial {t.number}" in listed
    assert listed.count("Pruned") >= sum(t.state == TrialState.PRUNED for t in s.trials)


def test_dashboard_study_page_draws_every_trials_intermediate_values(servers: dict[str, Server], study: dict,
                                                                    page: Any) -> None:
    s = study["study"]
    page.goto(f"{servers['dashboard'].url}/dashboard/studies/{s._study_id}")
    chart = page.locator(".MuiCard-root, .MuiPaper-root", has_text="Intermediate values").last
    chart.scroll_into_view_if_needed()
    lines = chart.locator(".scatterlayer .trace")
    lines.nth(len(s.trials) - 1).wait_for(state="attached")
    assert lines.count() == len(s.trials)  # pruned curves stop early next to the completed ones
    shot(page, "dashboard-study.png", full_page=True)


def test_dashboard_trial_page_shows_curve_params_attrs_note_link_and_artifacts(
    servers: dict[str, Server], study: dict, page: Any
) -> None:
    s = study["study"]
    t = next(t for t in s.trials if t.state == TrialState.PRUNED)
    page.goto(f"{servers['dashboard'].url}/dashboard/studies/{s._study_id}/trials")
    page.get_by_text(f"Trial {t.number}", exact=True).first.click()
    page.get_by_text(f"Trial {t.number} (trial_id=").wait_for()
    page.get_by_text(f"trial-{t.number}-curves.png").wait_for()
    text = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
    for step, value in t.intermediate_values.items():
        assert f"{step} {value!r}" in text  # the per-epoch curve, as the dashboard lists it
    for name, value in t.params.items():
        assert f"{name} {value!r}" in text
    for key in ("epochs_run", "pruned_epoch", "reason", "mlflow_run_id", "mlflow_run_url"):
        assert f"{key} {t.user_attrs[key]}" in text
    assert f"pruned at epoch {t.user_attrs['pruned_epoch']}" in text  # the trial's note
    link = page.get_by_role("link", name=f"MLflow run trial-{t.number}")
    assert link.get_attribute("href") == t.user_attrs["mlflow_run_url"]
    shot(page, "dashboard-trial.png")


def test_mlflow_ui_opens_on_the_runs_table_with_nested_trial_runs_a_metric_column_and_a_chart(
    servers: dict[str, Server], study: dict, page: Any
) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    s = study["study"]
    client = MlflowClient(f"sqlite:///{study['work'] / 'runs' / 'quickstart' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent_run = client.get_run(s.user_attrs["mlflow_parent_run_id"]).info
    assert parent_run.status == "FINISHED"
    assert parent_run.end_time - parent_run.start_time > 2000  # it lasted the study, not a few milliseconds
    # the address `hpo ui` tells the user to open, taken from its own output
    link = re.search(r"open the study's runs: (\S+)", servers["ui"].output())
    assert link is not None, servers["ui"].output()
    assert link.group(1).startswith(f"http://127.0.0.1:{servers['ui'].port}/#/experiments/{experiment.experiment_id}")
    page.goto(link.group(1))
    parent = page.locator("[role=row]", has_text="quickstart").first
    parent.wait_for()  # the runs table, with no click on "Training runs" or "Model training"
    assert "/runs" in page.url and page.get_by_role("heading", name="Overview").count() == 0  # not the GenAI view
    assert page.get_by_role("columnheader", name="Run Name").count() >= 1
    assert page.locator("[role=row]", has_text="trial-").count() == 0  # nested: hidden until expanded
    close = page.get_by_role("button", name="Close")
    if close.count():  # the assistant side panel: without it the table has room for the metric column
        close.first.click()
    show_columns(page, {"val_accuracy": True, "Dataset": False, "Source": False})
    page.get_by_role("columnheader", name="val_accuracy").first.wait_for()
    parent.locator("button[data-component-id*=runnamecellrenderer]").click()
    # the UI fills the table in as its requests come back: wait for what is asserted (expect retries until it holds)
    expect(page.locator("[role=row]", has_text="trial-")).to_have_count(len(s.trials))
    table = page.locator("[role=grid], [role=treegrid]").first
    for t in s.trials:  # each trial's last val_accuracy, in the metric column (the latest logged value)
        expect(table).to_contain_text(repr(t.intermediate_values[max(t.intermediate_values)]))
    shot(page, "mlflow-runs.png")
    page.locator("label", has=page.locator("input[name=runs-view-mode][value=CHART]")).click()
    page.get_by_placeholder("Search metric charts").fill("val_accuracy")
    # One val_accuracy curve per trial run in a line chart, compared with the trial's intermediate values (what the
    # study reported at each epoch); not a count of SVG traces, which any metric's chart has (two per run).
    points = {f"trial-{t.number}": len(t.intermediate_values) for t in s.trials}
    curves = page.wait_for_function(CURVES_OF_METRIC, arg={"metric": "val_accuracy", "points": points}).json_value()
    for t in s.trials:
        steps = sorted(t.intermediate_values)
        assert curves[f"trial-{t.number}"] == [steps, [t.intermediate_values[e] for e in steps]], t.number
    assert "val_accuracy" in page.inner_text("body")
    shot(page, "mlflow-chart.png")

