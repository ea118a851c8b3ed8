"""optuna-dashboard and the MLflow UI as a user sees them: real servers (`hpo dashboard`, `hpo ui`) on a finished
quickstart study, pages rendered by a real headless chromium (Debian's, driven by Playwright), assertions on the
rendered text and charts. Screenshots go to test-artifacts/. Without a browser these tests skip and say why."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from tests.finished_study import QUICKSTART, REPO, Server, finished_study

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _no_browser() -> str:
    if not CHROMIUM.exists():
        return (f"no browser: {CHROMIUM} is missing (as root: apt-get install -y chromium; .ci/run does this "
                "before `make test`)")
    if importlib.util.find_spec("playwright") is None:
        return "no browser driver: the playwright package is missing (pip install -e '.[dev]')"
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
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


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


def test_mlflow_ui_lists_the_experiment_nested_trial_runs_and_a_metric_chart(
    servers: dict[str, Server], study: dict, page: Any
) -> None:
    from mlflow.tracking import MlflowClient

    base, s = servers["ui"].url, study["study"]
    client = MlflowClient(f"sqlite:///{study['work'] / 'runs' / 'quickstart' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("quickstart").experiment_id
    page.goto(f"{base}/#/experiments")
    page.get_by_role("link", name="quickstart").first.wait_for()
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    parent = page.locator("[role=row]", has_text="quickstart").first
    parent.wait_for()
    assert page.locator("[role=row]", has_text="trial-").count() == 0  # nested: hidden until expanded
    parent.locator("button[data-component-id*=runnamecellrenderer]").click()
    last = max(t.number for t in s.trials)
    page.get_by_text(f"trial-{last}", exact=True).wait_for()
    assert page.locator("[role=row]", has_text="trial-").count() == len(s.trials)
    close = page.get_by_role("button", name="Close")
    if close.count():  # the assistant side panel, for a wider screenshot
        close.first.click()
    shot(page, "mlflow-runs.png")
    page.locator("label", has=page.locator("input[name=runs-view-mode][value=CHART]")).click()
    page.get_by_placeholder("Search metric charts").fill("val_accuracy")
    chart = page.locator(".js-plotly-plot", has=page.locator(".scatterlayer .trace")).last
    chart.wait_for()
    traces = chart.locator(".scatterlayer .trace")
    assert traces.count() >= len(s.trials)  # one val_accuracy curve per trial run
    assert "val_accuracy" in page.inner_text("body")
    shot(page, "mlflow-chart.png")

