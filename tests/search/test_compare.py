"""`hpo compare` end to end on a tiny study (real training), its replay mode, its planning, and its outputs
(table, CSV, chart) rendered from a hand-made results table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.cli import main
from search.compare import Row, parse_strategies, plan_compare
from search.compare_render import CSV_COLUMNS, markdown_table, mean_curve, write_outputs
from search.errors import SettingsError

# Early stopping with min_delta 10 on val_loss never sees an improvement after epoch 0, so with patience 1
# every trial stops after exactly 2 of its 4 epochs; the threshold pruner (val_accuracy below 1.01) prunes
# every trial at epoch 0. Both make the expected epochs exact, whatever the training reaches.
TINY = """
[study]
name = "tiny"
n_trials = 3
max_epochs = 4

[sampler]
name = "tpe"
seed = 7
n_startup_trials = 10

[pruner]
name = "threshold"
lower = 1.01

[early_stopping]
monitor = "val_loss"
mode = "min"
patience = 1
min_delta = 10.0

[space.lr]
type = "float"
low = 1e-2
high = 1e-1
log = true

[objective]
name = "cnn"
dataset = "digits"
widths = [16]
batch_size = 32
val_size = 0.2
test_size = 0.2
device = "cpu"
"""
STRATEGIES = "none,early_stopping,threshold,median+early_stopping"


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("compare")
    study_file = work / "tiny.toml"
    study_file.write_text(TINY)
    common = [str(study_file), "--strategies", STRATEGIES, "--seeds", "1", "--run-dir", str(work / "runs")]
    assert main(["compare", *common, "--out", str(work / "real")]) == 0
    assert main(["compare", *common, "--out", str(work / "replay"), "--replay"]) == 0
    return {"work": work, "storage": f"sqlite:///{work / 'runs' / 'tiny-compare' / 'optuna.db'}"}


def read_csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}


@pytest.mark.slow
def test_one_row_per_strategy_in_table_and_csv(compared: dict) -> None:
    header, rows = read_csv(compared["work"] / "real" / "compare.csv")
    assert tuple(header) == CSV_COLUMNS
    assert list(rows) == STRATEGIES.split(",")
    assert {r["seed"] for r in rows.values()} == {"7"}
    table = (compared["work"] / "real" / "compare.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0].startswith("| strategy | best val acc (mean ± sd) | test acc of best | epochs spent")
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[1:]] == STRATEGIES.split(",")
    png = compared["work"] / "real" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_pruning_and_early_stopping_spend_fewer_epochs_than_none(compared: dict) -> None:
    _, rows = read_csv(compared["work"] / "real" / "compare.csv")
    spent = {name: int(r["epochs_spent"]) for name, r in rows.items()}
    assert spent["none"] == 3 * 4 and float(rows["none"]["budget_fraction"]) == 1.0
    assert spent["early_stopping"] == 3 * 2 < spent["none"]
    assert spent["threshold"] == 3 * 1 < spent["none"]
    assert spent["median+early_stopping"] <= spent["early_stopping"]
    assert float(rows["early_stopping"]["budget_fraction"]) == 0.5
    assert rows["threshold"]["best_val_accuracy"] == ""  # every trial pruned: no completed trial to be best
    assert 0.3 < float(rows["none"]["best_val_accuracy"]) <= 1.0
    assert 0.3 < float(rows["none"]["test_accuracy"]) <= 1.0
    # wall time is the storage's record of each trial's duration, summed (not a timing the test makes)
    for name, study_name in (("none", "tiny-cmp-none-s7"), ("threshold", "tiny-cmp-threshold-s7")):
        trials = optuna.load_study(study_name=study_name, storage=compared["storage"]).trials
        durations = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
        assert float(rows[name]["wall_seconds"]) == pytest.approx(durations, abs=0.01) and durations > 0


@pytest.mark.slow
def test_each_strategy_is_its_own_study_with_the_same_configurations(compared: dict) -> None:
    storage = compared["storage"]
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"tiny-cmp-none-s7", "tiny-cmp-early_stopping-s7", "tiny-cmp-threshold-s7",
                     "tiny-cmp-median-early_stopping-s7"}
    params = {n: [t.params for t in optuna.load_study(study_name=n, storage=storage).trials] for n in names}
    assert len({repr(p) for p in params.values()}) == 1  # same sampler seed: same configurations everywhere
    es = optuna.load_study(study_name="tiny-cmp-early_stopping-s7", storage=storage)
    assert all(t.user_attrs["early_stopped"] for t in es.trials)


@pytest.mark.slow
def test_replay_reproduces_the_real_runs_without_training(compared: dict) -> None:
    """Training is deterministic on the CPU and every strategy saw the same configurations, so replaying
    the 'none' curves must give the real runs' epochs and accuracies exactly."""
    _, real = read_csv(compared["work"] / "real" / "compare.csv")
    header, replayed = read_csv(compared["work"] / "replay" / "compare-replay.csv")
    assert tuple(header) == CSV_COLUMNS and list(replayed) == list(real)
    for name in real:
        assert replayed[name]["epochs_spent"] == real[name]["epochs_spent"], name
        assert replayed[name]["budget_fraction"] == real[name]["budget_fraction"], name
        assert replayed[name]["best_val_accuracy"] == real[name]["best_val_accuracy"], name
    assert replayed["none"]["test_accuracy"] == real["none"]["test_accuracy"]
    # replay time is the recorded epoch_seconds of the epochs replayed: all of them for none, the first two of
    # every trial for early stopping (both read back from the MLflow runs of the 'none' study)
    client = MlflowClient(tracking_uri=f"sqlite:///{compared['work'] / 'runs' / 'tiny-compare' / 'mlflow.db'}")
    source = optuna.load_study(study_name="tiny-cmp-none-s7", storage=compared["storage"]).trials
    seconds = [{m.step: m.value for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "epoch_seconds")}
               for t in source]
    assert float(replayed["none"]["wall_seconds"]) == pytest.approx(sum(sum(s.values()) for s in seconds), abs=0.01)
    assert float(replayed["early_stopping"]["wall_seconds"]) == pytest.approx(
        sum(s[0] + s[1] for s in seconds), abs=0.01)
    summaries = optuna.get_all_study_summaries(compared["storage"])
    assert len(summaries) == 4  # replay studies live in memory, nothing new in the storage


@pytest.mark.slow
def test_compare_logs_best_models_but_does_not_fill_the_registry(compared: dict) -> None:
    """Dozens of strategy x seed studies would each add a registered model version; they are only logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(compared["storage"].replace("optuna.db", "mlflow.db"))
    assert client.search_registered_models() == []
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`hpo.role` = 'study'")
    assert len(parents) == 4 and {p.info.status for p in parents} == {"FINISHED"}
    logged = [p for p in parents if p.data.tags.get("best_model_uri")]
    assert logged and all(p.data.tags["best_model_version"] == "" for p in logged)


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_and_leaves_the_first_results(
        compared: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A rerun in the same place once resumed the first run's studies: with max_epochs 4 then 6 it trained nothing
    and showed 'none' spending 12 epochs, 67% of a 3 x 6 budget. Now it is refused and nothing changes."""
    from search import records

    work, storage = compared["work"], compared["storage"]

    def trials() -> dict[str, list[tuple[int, str, int]]]:
        return {s.study_name: [(t.number, t.state.name, records.epochs_trained(t))
                               for t in optuna.load_study(study_name=s.study_name, storage=storage).trials]
                for s in optuna.get_all_study_summaries(storage)}

    before, table = trials(), (work / "real" / "compare.csv").read_text()
    common = ["compare", str(work / "tiny.toml"), "--strategies", STRATEGIES, "--seeds", "1",
              "--run-dir", str(work / "runs")]
    assert main([*common, "--out", str(work / "real"), "--set", "study.max_epochs=6"]) == 2
    err = capsys.readouterr().err
    assert ("from an earlier `hpo compare` with other settings: 'tiny-cmp-none-s7' has a different "
            "study.max_epochs (4 there, 6 in the file), and 3 more of its studies differ") in err, err
    assert "nothing was trained" in err and "--run-dir DIR" in err and "warm-up" not in err, err
    assert main([*common, "--out", str(work / "real"), "--trials", "2"]) == 2  # the table would count 3 a study
    assert "number of finished trials (3 there, --trials 2 now)" in capsys.readouterr().err
    # A replay reads only the 'none' curves: another early stopping replays them, another max_epochs does not.
    assert main([*common, "--out", str(tmp_path), "--replay", "--set", "early_stopping.patience=2"]) == 0
    err = capsys.readouterr().err
    assert "replaying 4 strategies x 1 seed of 'tiny'" in err and "registered" not in err, err  # it logs no model
    assert main([*common, "--out", str(tmp_path), "--replay", "--set", "study.max_epochs=6"]) == 2
    assert "study.max_epochs (4 there, 6 in the file)" in capsys.readouterr().err
    assert trials() == before and (work / "real" / "compare.csv").read_text() == table


# --- pieces -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_warm_up_trains_one_untimed_trial_outside_the_plans_stores_and_only_when_something_will_train(
        compared: dict, tmp_path: Path) -> None:
    """Before it, a process's first trial (the first strategy's) paid the one-time costs: 5.2 s against 1.8 s
    for each later strategy at the same 12 epochs, shown as 51% "time saved" by early stopping."""
    import tempfile

    from search.compare import warm_up

    study_file = tmp_path / "tiny.toml"
    study_file.write_text(TINY)
    before = set(Path(tempfile.gettempdir()).glob("hpo-compare-warm-up-*"))
    lines: list[str] = []
    plan = plan_compare(study_file, [], "none,threshold", 1, None, tmp_path / "runs")
    seconds = warm_up(plan, lines.append)
    assert seconds is not None and seconds > 0 and len(lines) == 1 and lines[0].startswith("warm-up: one untimed")
    assert optuna.get_all_study_summaries(plan.storage_url) == []  # nothing of it in the plan's storage
    assert set(Path(tempfile.gettempdir()).glob("hpo-compare-warm-up-*")) == before  # its folder deleted
    # the module's comparison has finished every study: a repeated `hpo compare` trains nothing, so no warm-up
    done = plan_compare(compared["work"] / "tiny.toml", [], STRATEGIES, 1, None, compared["work"] / "runs")
    lines.clear()
    assert warm_up(done, lines.append) is None and lines == []


def test_strategies_parse_and_refuse_unknown_names() -> None:
    parsed = parse_strategies("none, early_stopping,median+early_stopping,hyperband")
    assert [(s.pruner, s.early_stopping) for s in parsed] == [
        ("none", False), ("none", True), ("median", True), ("hyperband", False)]
    assert parsed[2].slug == "median-early_stopping"
    for bad in ("medain", "median+hyperband", "early_stopping+early_stopping", "none,none", ""):
        with pytest.raises(SettingsError):
            parse_strategies(bad)
    # One name per strategy, whatever order its parts are written in: its studies are found again by that name.
    spelled = parse_strategies("early_stopping+median, none+early_stopping, median+none")
    assert [s.name for s in spelled] == ["median+early_stopping", "early_stopping", "median"]
    with pytest.raises(SettingsError, match="names the strategy 'median\\+early_stopping' twice \\('early_stopping\\+"
                                            "median' is the same as 'median\\+early_stopping'\\); list each strategy"):
        parse_strategies("median+early_stopping,early_stopping+median")


def test_compare_with_an_empty_strategies_list_is_refused_not_the_default(capsys: pytest.CaptureFixture[str],
                                                                         tmp_path: Path) -> None:
    from search.cli import main

    code = main(["compare", str(Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml"),
                 "--strategies", "", "--run-dir", str(tmp_path / "runs")])
    assert code == 2 and "--strategies is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_plan_keeps_shared_pruner_options_and_varies_only_strategy(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    plan = plan_compare(repo / "studies" / "quickstart.toml", ["study.max_epochs=5"],
                        "none,median,median_carry_forward+early_stopping,hyperband", 2, 6, tmp_path)
    assert plan.seeds == [42, 43] and plan.n_trials == 6
    cf = plan.settings[("median_carry_forward+early_stopping", 43)]
    assert cf.study.name == "quickstart-cmp-median_carry_forward-early_stopping-s43"
    assert (cf.pruner.name, cf.pruner.n_startup_trials, cf.pruner.n_warmup_steps) == ("median_carry_forward", 3, 2)
    assert cf.early_stopping.enabled and cf.sampler.seed == 43 and cf.study.max_epochs == 5
    hb = plan.settings[("hyperband", 42)]
    assert hb.pruner.n_startup_trials is None and not hb.early_stopping.enabled
    assert all(s.space == plan.base.space and s.objective == plan.base.objective for s in plan.settings.values())
    assert plan.storage_url == f"sqlite:///{tmp_path.resolve() / 'quickstart-compare' / 'optuna.db'}"


def test_table_means_and_time_saved() -> None:
    rows = [Row("none", 1, 0.90, 0.88, 40, 1.0, 20.0, [(20, 0.9), (40, 0.9)]),
            Row("none", 2, 0.92, 0.90, 40, 1.0, 20.0, [(20, 0.92), (40, 0.92)]),
            Row("median", 1, 0.90, 0.88, 20, 0.5, 10.0, [(10, math.nan), (20, 0.9)]),
            Row("median", 2, 0.94, 0.92, 30, 0.75, 15.0, [(10, 0.94), (30, 0.94)])]
    table = markdown_table(rows, ["none", "median"])
    assert "| none | 0.9100 ± 0.0141 | 0.8900 ± 0.0141 | 40 | 100% | 20.0 s | 0% |" in table
    assert "| median | 0.9200 ± 0.0283 | 0.9000 ± 0.0283 | 25 | 62% | 12.5 s | 38% |" in table
    rows[3].test_accuracy = math.nan  # a replay that could not score the best trial's weights
    assert "| 0.8800 (1 of 2 seeds) |" in markdown_table(rows, ["none", "median"])
    xs, ys = mean_curve(rows[2:])
    assert xs[-1] == 25  # the mean epochs spent of the two seeds
    # seed 1 has no completed trial before epoch 20, so the mean is undefined until then; seed 1 then
    # holds its final 0.90 while seed 2 is still running
    assert all(math.isnan(y) for y in ys[:19]) and ys[xs.index(20)] == ys[-1] == pytest.approx(0.92)


def test_outputs_render_from_a_hand_made_table(tmp_path: Path) -> None:
    """No training: the Markdown lines, the CSV cells (NaN left empty) and a real PNG, from rows made by hand."""
    rows = [Row("none", 1, 0.90, 0.88, 40, 1.0, 20.0, [(20, 0.9), (40, 0.9)]),
            Row("none", 2, 0.92, 0.90, 40, 1.0, 20.0, [(20, 0.92), (40, 0.92)]),
            Row("median", 1, 0.90, 0.88, 20, 0.5, 10.0, [(10, math.nan), (20, 0.9)]),
            Row("median", 2, 0.94, math.nan, 30, 0.75, 15.0, [(10, 0.94), (30, 0.94)]),
            Row("hyperband", 1, math.nan, math.nan, 8, 0.2, 3.0, [(4, math.nan), (8, math.nan)])]
    paths = write_outputs(rows, ["none", "median", "hyperband", "not run"], tmp_path / "out", False,
                          "hand-made: 2 seeds", "A hand-made table.")
    assert paths == {kind: tmp_path / "out" / f"compare.{kind}" for kind in ("md", "csv", "png")}
    assert paths["md"].read_text().splitlines() == [
        "A hand-made table.",
        "",
        "| strategy | best val acc (mean ± sd) | test acc of best | epochs spent | % of full budget | wall time "
        "| time saved vs none |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| none | 0.9100 ± 0.0141 | 0.8900 ± 0.0141 | 40 | 100% | 20.0 s | 0% |",
        "| median | 0.9200 ± 0.0283 | 0.8800 (1 of 2 seeds) | 25 | 62% | 12.5 s | 38% |",
        "| hyperband | n/a | n/a | 8 | 20% | 3.0 s | 85% |",
    ]
    with open(paths["csv"], newline="") as fh:
        cells = list(csv.reader(fh))
    assert tuple(cells[0]) == CSV_COLUMNS == ("strategy", "seed", "best_val_accuracy", "test_accuracy",
                                              "epochs_spent", "budget_fraction", "wall_seconds")
    assert cells[1:] == [["none", "1", "0.900000", "0.880000", "40", "1.0000", "20.00"],
                         ["none", "2", "0.920000", "0.900000", "40", "1.0000", "20.00"],
                         ["median", "1", "0.900000", "0.880000", "20", "0.5000", "10.00"],
                         ["median", "2", "0.940000", "", "30", "0.7500", "15.00"],
                         ["hyperband", "1", "", "", "8", "0.2000", "3.00"]]
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 500_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
    assert (width, height) == (960, 600)  # 8 x 5 inches at 120 dpi
    replayed = write_outputs(rows[:2], ["none"], tmp_path / "out", True, "t", "i")
    assert {p.name for p in replayed.values()} == {"compare-replay.md", "compare-replay.csv", "compare-replay.png"}


def test_the_chart_does_not_use_pyplot(tmp_path: Path) -> None:
    """pyplot keeps global figures and may pick an interactive backend; the chart is drawn without it."""
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from search.compare import Row; "
              "from search.compare_render import write_chart; "
              "write_chart([Row('none', 1, 0.9, 0.9, 4, 1.0, 1.0, [(2, 0.9), (4, 0.9)])], ['none'], "
              f"Path({str(tmp_path / 'c.png')!r}), 't'); print('matplotlib.pyplot' in sys.modules)")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False" and (tmp_path / "c.png").stat().st_size > 1000
