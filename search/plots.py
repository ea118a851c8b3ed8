"""PNG plots drawn with matplotlib (Agg: no display, no browser), for MLflow artifacts and the dashboard.

Study plots are Optuna's matplotlib visualizations plus the "epochs spent per trial, by outcome" bar chart. A
trial's own curves, drawn as each trial ends, are Pillow's (search/curves_png.py): matplotlib cost too much there.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.records import outcome

OUTCOME_COLORS = {"completed": "#2a9d8f", "early stopped": "#457b9d", "pruned": "#e9c46a", "failed": "#e76f51",
                  "running": "#adb5bd"}
log = logging.getLogger(__name__)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    if fig.canvas.manager is not None:  # made by pyplot (Optuna's plots): free it
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def epochs_by_outcome_png(trials: Sequence[FrozenTrial], max_epochs: int, path: Path) -> Path:
    """One bar per trial: epochs it ran, coloured by how it ended, against the full per-trial budget."""
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    seen: set[str] = set()
    for t in trials:
        kind = outcome(t)
        ax.bar(t.number, int(t.user_attrs.get(records.EPOCHS_RUN) or 0), color=OUTCOME_COLORS.get(kind, "#adb5bd"),
               label=None if kind in seen else kind)
        seen.add(kind)
    ax.axhline(max_epochs, color="grey", linestyle="--", linewidth=1, label=f"max_epochs = {max_epochs}")
    ax.set_xlabel("trial")
    ax.set_ylabel("epochs run")
    ax.set_title("Epochs spent per trial, by outcome")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


@contextlib.contextmanager
def quiet_plots() -> Iterator[None]:
    """Optuna's plots warn through Python warnings and through Optuna's own logger ("Study instance does not
    contain completed trials"): a report says what it left out itself, so neither reaches the user's terminal."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


# Optuna draws these empty (and warns) with fewer complete trials; importances need two to compare. Read by the
# PNGs here and the HTML report's figures (search/report.py), by the plot function's name (plotly and matplotlib).
COMPLETE_TRIALS_NEEDED = {"plot_optimization_history": 1, "plot_parallel_coordinate": 1, "plot_slice": 1,
                          "plot_param_importances": 2}


def complete_trials_needed(plot: Callable[..., Any]) -> int:
    return COMPLETE_TRIALS_NEEDED.get(plot.__name__, 0)


def _optuna_png(plot: Callable[..., Any], study: optuna.Study, path: Path, complete: int) -> Path | None:
    if complete < complete_trials_needed(plot):
        return None
    with quiet_plots():
        try:
            ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for this plot
            log.info("skipped %s: %s", path.name, exc)
            return None
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8, 4.5)
    return _save(fig, path)


def study_pngs(study: optuna.Study, max_epochs: int, out: Path) -> list[Path]:
    """The key plots as PNGs in ``out``; a plot that needs more trials than the study has is left out."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna's matplotlib plots go through pyplot; never open a window
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    paths = [
        _optuna_png(ovm.plot_optimization_history, study, out / "optimization_history.png", complete),
        _optuna_png(ovm.plot_intermediate_values, study, out / "intermediate_values.png", complete),
        _optuna_png(ovm.plot_param_importances, study, out / "param_importances.png", complete),
        epochs_by_outcome_png(trials, max_epochs, out / "epochs_by_outcome.png"),
    ]
    return [p for p in paths if p is not None]
