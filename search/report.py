"""`hpo report`: one self-contained HTML file (plotly.js inlined, opens offline) and PNGs of the key plots.

The HTML holds Optuna's plotly visualizations (optimization history, intermediate values, parallel
coordinates, parameter importances, slice), an "epochs spent per trial, by outcome" chart and the fit
diagnosis of every completed trial with its curves. The PNGs come from matplotlib (see ``search/plots.py``).
Both go to the study's MLflow parent run; each diagnosis also becomes the child run's ``fit_diagnosis`` tag.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.diagnosis import Diagnosis
from search.errors import TrackingError
from search.notes import epoch_account
from search.plots import OUTCOME_COLORS, complete_trials_needed, quiet_plots, study_pngs
from search.records import best_trial, outcome
from search.stores import redact
from search.summary import counts
from search.tracking import Tracker, existing_tracker, log_files, probe_server, run_url, set_tags

log = logging.getLogger(__name__)
LABEL_COLORS = {"underfitting": "#e9c46a", "overfitting": "#e76f51", "good fit": "#2a9d8f", "unknown": "#adb5bd"}


@dataclass
class TrialFit:
    trial: FrozenTrial
    history: dict[str, list[float]]
    diagnosis: Diagnosis | None
    url: str | None


@dataclass
class Report:
    html: Path
    pngs: list[Path]
    fits: list[TrialFit] = field(default_factory=list)
    logged_to: str | None = None


def max_epochs_of(study: optuna.Study) -> int:
    """The per-trial epoch budget of the study's latest run; for a study run before that was recorded, the one it
    was created with (else the most any trial ran)."""
    settings = study.user_attrs.get(records.SETTINGS) or {}
    value = study.user_attrs.get(records.MAX_EPOCHS) or settings.get("study", {}).get("max_epochs")
    if value:
        return int(value)
    return max((int(t.user_attrs.get(records.EPOCHS_RUN) or 0) for t in study.trials), default=0)


def trial_fits(study: optuna.Study, tracker: Tracker | None, max_epochs: int) -> list[TrialFit]:
    """Curves (from MLflow) and diagnosis of every completed trial; no tracker means no curves, label unknown."""
    from search.publish import fit_of

    fits = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = t.user_attrs.get(records.MLFLOW_RUN_ID)
        if tracker is not None and run_id:
            history, diagnosis = fit_of(tracker, run_id, max_epochs)
            fits.append(TrialFit(t, history, diagnosis, run_url(tracker, run_id)))
        else:
            fits.append(TrialFit(t, {}, Diagnosis("unknown", "no MLflow curves for this trial"), None))
    return fits


def _figure(make: Callable[[], Any]) -> Any:
    with quiet_plots():
        try:
            return make()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            return str(exc) or type(exc).__name__


def epochs_figure(trials: list[FrozenTrial], max_epochs: int) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for kind, color in OUTCOME_COLORS.items():
        group = [t for t in trials if outcome(t) == kind]
        if group:
            fig.add_bar(x=[t.number for t in group], y=[int(t.user_attrs.get(records.EPOCHS_RUN) or 0) for t in group],
                        name=kind, marker_color=color,
                        hovertext=[str(t.user_attrs.get(records.REASON, "")) for t in group])
    fig.add_hline(y=max_epochs, line_dash="dash", line_color="grey", annotation_text=f"max_epochs = {max_epochs}")
    fig.update_layout(title="Epochs spent per trial, by outcome", xaxis_title="trial", yaxis_title="epochs run",
                      barmode="overlay")
    return fig


def curves_figure(fits: list[TrialFit]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for fit in fits:
        label = fit.diagnosis.label if fit.diagnosis else "unknown"
        color = LABEL_COLORS.get(label, "#adb5bd")
        for key, dash in (("val_loss", "solid"), ("train_loss", "dot")):
            values = fit.history.get(key, [])
            if values:
                fig.add_scatter(x=list(range(len(values))), y=values, mode="lines", line={"color": color, "dash": dash},
                                name=f"trial {fit.trial.number} {key} ({label})", legendgroup=str(fit.trial.number))
    fig.update_layout(title="Train (dotted) and validation (solid) loss of completed trials, coloured by diagnosis",
                      xaxis_title="epoch", yaxis_title="loss")
    return fig


def _section(title: str, text: str, fig: Any, first: bool) -> tuple[str, bool]:
    body = f"<section><h2>{html.escape(title)}</h2><p>{text}</p>"
    if isinstance(fig, str):
        return body + f"<p class='skip'>Not drawn: {html.escape(fig)}</p></section>", first
    body += fig.to_html(full_html=False, include_plotlyjs=first, default_height="460px")
    return body + "</section>", False


def _fit_table(fits: list[TrialFit]) -> str:
    rows = []
    for f in fits:
        d = f.diagnosis or Diagnosis("unknown", "")
        link = f"<a href='{html.escape(f.url)}'>MLflow run</a>" if f.url else ""
        rows.append(f"<tr><td>{f.trial.number}</td><td>{f.trial.value:.4g}</td>"
                    f"<td>{f.trial.user_attrs.get(records.EPOCHS_RUN)}</td><td>{html.escape(outcome(f.trial))}</td>"
                    f"<td class='label' style='background:{LABEL_COLORS.get(d.label, '#fff')}'>{d.label}</td>"
                    f"<td>{html.escape(d.reason)}</td><td>{link}</td></tr>")
    return ("<table id='fit-diagnosis'><tr><th>trial</th><th>value</th><th>epochs</th><th>outcome</th>"
            "<th>fit</th><th>why</th><th></th></tr>" + "".join(rows) + "</table>")


RULES_HTML = """<ol>
<li><b>unknown</b>: fewer than 3 epochs of finite train and validation loss.</li>
<li><b>underfitting</b>: the last train loss is above half the first epoch's (the model barely learned), or
the trial ran the full epoch budget with its best validation loss in the last two epochs and validation loss
still falling by more than 2% over the last 3 epochs (it was still learning).</li>
<li><b>overfitting</b>: validation loss ended more than 10% above its minimum while train loss kept falling
after that minimum; or at the best epoch validation loss is more than 2x the train loss and 0.1 above it.</li>
<li><b>good fit</b>: none of the above.</li></ol>"""

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
section{margin:2em 0}.skip{color:#a00}.label{font-weight:bold}"""


def build_html(study: optuna.Study, fits: list[TrialFit], max_epochs: int) -> str:
    """The whole report as one HTML string; plotly.js is inlined once, in the first figure."""
    from optuna import visualization as vis

    trials = study.get_trials(deepcopy=False)
    c, acc, best = counts(study), epoch_account(trials, max_epochs), best_trial(study)
    best_line = "no completed trial yet"
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        test = records.test_metrics(study, best)
        tests = "".join(f", {k} {v:.4f}" for k, v in test.items())
        best_line = f"trial #{best.number}, value {best.value:.4f}{tests}; {html.escape(params)}"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Study {html.escape(study.study_name)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Study {html.escape(study.study_name)}</h1>",
        f"<p>Generated {datetime.now():%Y-%m-%d %H:%M}. {c['COMPLETE']} complete, {c['PRUNED']} pruned, "
        f"{c['FAIL']} failed, {c['RUNNING']} running. Epochs: {acc.spent} spent of {acc.full} "
        f"({acc.per_trial}); saved by pruning {acc.saved_by_pruning}, by early stopping "
        f"{acc.saved_by_early_stopping}.</p>",
        f"<p id='best'>Best: {best_line}</p>",
    ]
    def optuna_figure(plot: Callable[..., Any]) -> Callable[[], Any]:
        """The plot of the study, or what it needs when Optuna would draw it empty (plots.COMPLETE_TRIALS_NEEDED)."""
        n = complete_trials_needed(plot)
        if c["COMPLETE"] >= n:
            return lambda: plot(study)
        return lambda: f"needs {n} complete trial{'s' if n > 1 else ''}; the study has {c['COMPLETE']}"

    figures = [
        ("Optimization history", "Each trial's value and the best so far.",
         optuna_figure(vis.plot_optimization_history)),
        ("Intermediate values", "The study metric per epoch of every trial: pruned curves stop early.",
         optuna_figure(vis.plot_intermediate_values)),
        ("Epochs spent per trial, by outcome", "Bars below the dashed line are epochs saved by pruning or early "
         "stopping.", lambda: epochs_figure(trials, max_epochs)),
        ("Parallel coordinates", "Parameters of each trial, coloured by value.",
         optuna_figure(vis.plot_parallel_coordinate)),
        ("Parameter importances", "fANOVA importance of each parameter for the value.",
         optuna_figure(vis.plot_param_importances)),
        ("Slice", "Value against each parameter.", optuna_figure(vis.plot_slice)),
    ]
    first = True
    for title, text, make in figures:
        section, first = _section(title, text, _figure(make), first)
        parts.append(section)
    parts.append("<section><h2>Fit diagnosis</h2><p>Each completed trial labelled from its train and validation "
                 "loss curves (from MLflow), by these rules in order:</p>" + RULES_HTML + _fit_table(fits)
                 + "</section>")
    section, first = _section("Loss curves", "", _figure(lambda: curves_figure(fits)), first)
    parts.append(section)
    parts.append("</body></html>")
    return "\n".join(parts)


def _study_tracker(study: optuna.Study, tracking_uri: str) -> Tracker | None:
    """The study's experiment in ``tracking_uri``, for its loss curves. A study that logged to MLflow (it has a
    parent run) but is not in that store was logged elsewhere: a report without its curves would label every trial
    "unknown" (and replace a good report), so it is refused before anything is written. A tracking server is asked
    first, in seconds (MLflow's client retries for minutes where nothing answers)."""
    if tracking_uri.startswith(("http://", "https://")):
        probe_server(tracking_uri)  # one paragraph when nothing, or something other than MLflow, answers there
    tracker = existing_tracker(tracking_uri, study.study_name)
    if tracker is None and study.user_attrs.get(records.PARENT_RUN_ID):
        raise TrackingError(
            f"the MLflow tracking store {redact(tracking_uri)} has no experiment {study.study_name!r}, but the study "
            "logged its trials to MLflow: it was run with another --tracking-uri (the one its `hpo run` or `hpo "
            "worker` commands used, such as http://HOST:5000 for workers on several machines). Pass that "
            "--tracking-uri; the report reads each trial's loss curves from there. Nothing was written."
        )
    return tracker


def write_report(study: optuna.Study, tracking_uri: str, out: Path, log_to_mlflow: bool = True) -> Report:
    """Write ``out/report.html`` and ``out/*.png``; log them on the parent run and tag each child with its fit."""
    tracker = _study_tracker(study, tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    max_epochs = max_epochs_of(study)
    fits = trial_fits(study, tracker, max_epochs)
    page = out / "report.html"
    page.write_text(build_html(study, fits, max_epochs), encoding="utf-8")
    pngs = study_pngs(study, max_epochs, out)
    report = Report(page, pngs, fits)
    parent = study.user_attrs.get(records.PARENT_RUN_ID)
    if log_to_mlflow and tracker is not None and parent:
        for fit in fits:
            if fit.diagnosis and fit.trial.user_attrs.get(records.MLFLOW_RUN_ID):
                set_tags(tracker, fit.trial.user_attrs[records.MLFLOW_RUN_ID],
                         {"fit_diagnosis": fit.diagnosis.label, "fit_diagnosis_reason": fit.diagnosis.reason})
        log_files(tracker, parent, pngs, "plots")
        log_files(tracker, parent, [page], "report")
        report.logged_to = parent
    return report
