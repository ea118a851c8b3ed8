"""`hpo compare`'s outputs, drawn from its results rows: the Markdown table, the CSV and the chart.

Kept apart from planning and running (search/compare.py) so the outputs can be made, and tested, from a
hand-made table without training. The chart uses matplotlib's object API (``Figure`` on an Agg canvas),
as search/plots.py does, never pyplot: no global figure registry, no backend switch, safe in any thread.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from search.compare import Row

CSV_COLUMNS = ("strategy", "seed", "best_val_accuracy", "test_accuracy", "epochs_spent", "budget_fraction",
               "wall_seconds")
# told apart in grey print too, where the colours are not
LINE_STYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def write_outputs(rows: Sequence[Row], strategies: Sequence[str], out: Path, replay: bool, title: str,
                  intro: str) -> dict[str, Path]:
    """compare[-replay].md / .csv / .png in ``out``; ``intro`` is the sentence above the table, ``title`` the
    chart's. Returns the paths by kind (md, csv, png)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare-replay" if replay else "compare"
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    write_csv(rows, paths["csv"])
    write_chart(rows, strategies, paths["png"], title)
    paths["md"].write_text(f"{intro}\n\n{markdown_table(rows, strategies)}\n")
    return paths


def markdown_table(rows: Sequence[Row], strategies: Sequence[str]) -> str:
    """The practitioners' table: one line per strategy, means (± sd) over seeds."""
    header = ("| strategy | best val acc (mean ± sd) | test acc of best | epochs spent | % of full budget "
              "| wall time | time saved vs none |")
    lines = [header, "|" + " --- |" * 7]
    by = {s: [r for r in rows if r.strategy == s] for s in strategies}
    none_wall = statistics.fmean(r.wall_seconds for r in by["none"]) if by.get("none") else None
    for strategy, group in by.items():
        if not group:
            continue
        wall = statistics.fmean(r.wall_seconds for r in group)
        saved = "n/a" if not none_wall else f"{1 - wall / none_wall:.0%}"
        lines.append(
            f"| {strategy} | {_mean_sd([r.best_val_accuracy for r in group])} "
            f"| {_mean_sd([r.test_accuracy for r in group])} "
            f"| {statistics.fmean(r.epochs_spent for r in group):.0f} "
            f"| {statistics.fmean(r.budget_fraction for r in group):.0%} | {wall:.1f} s | {saved} |"
        )
    return "\n".join(lines)


def _mean_sd(values: list[float], digits: int = 4) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    mean = statistics.fmean(finite)
    text = f"{mean:.{digits}f}" if len(finite) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(finite):.{digits}f}"
    return text if len(finite) == len(values) else f"{text} ({len(finite)} of {len(values)} seeds)"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per strategy x seed, columns ``CSV_COLUMNS``; a value that is not there (NaN) is left empty."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_cells(r) for r in rows)


def csv_cells(row: Row) -> list[Any]:
    return [row.strategy, row.seed, _num(row.best_val_accuracy, 6), _num(row.test_accuracy, 6),
            row.epochs_spent, _num(row.budget_fraction, 4), _num(row.wall_seconds, 2)]


def _num(value: float | None, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mean_curve(rows: Sequence[Row]) -> tuple[list[int], list[float]]:
    """Best-so-far against cumulative epochs, averaged over seeds, up to the mean epochs spent.

    A seed that has already finished holds its final best, so the line ends near the table's mean best
    value at the table's mean epochs spent. NaN until every seed has a completed trial.
    """
    end = round(statistics.fmean(r.curve[-1][0] for r in rows if r.curve))
    xs = list(range(1, end + 1))
    ys = []
    for x in xs:
        values = [_value_at(r.curve, x) for r in rows]
        ys.append(math.nan if any(math.isnan(v) for v in values) else statistics.fmean(values))
    return xs, ys


def _value_at(curve: list[tuple[int, float]], x: int) -> float:
    value = math.nan
    for spent, best in curve:
        if spent > x:
            break
        value = best
    return value


def write_chart(rows: Sequence[Row], strategies: Sequence[str], path: Path, title: str) -> None:
    """Best-so-far validation accuracy against epochs spent, one line per strategy (mean over seeds); a dot
    marks each strategy's mean epochs spent and mean best value."""
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg
    ax = fig.subplots()
    for i, strategy in enumerate(strategies):
        group = [r for r in rows if r.strategy == strategy and r.curve]
        if not group:
            continue
        xs, ys = mean_curve(group)
        (line,) = ax.plot(xs, ys, drawstyle="steps-post", label=strategy, linewidth=1.8,
                          linestyle=LINE_STYLES[i % len(LINE_STYLES)], alpha=0.85)
        best = [r.best_val_accuracy for r in group if not math.isnan(r.best_val_accuracy)]
        if best:  # the table's figures: mean epochs spent, mean best
            ax.plot([statistics.fmean(r.epochs_spent for r in group)], [statistics.fmean(best)], "o",
                    color=line.get_color())
    ax.set_xlabel("epochs spent (cumulative over trials, pruned and early-stopped included)")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
