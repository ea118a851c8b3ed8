"""The `hpo` command: run studies, inspect them, open optuna-dashboard and the MLflow UI."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from search.errors import HpoError, SettingsError

DESCRIPTION = """\
Hyperparameter search for PyTorch CNNs: Optuna studies with early stopping inside each trial,
pruning across trials, and MLflow tracking of every trial.

Start here:
  hpo run studies/quickstart.toml            tune a CNN on scikit-learn's digits (CPU, ~2 minutes)
  hpo status studies/quickstart.toml         table of trials: state, value, epochs, why each ended
  hpo best studies/quickstart.toml           the best trial's parameters, value and checkpoint
  hpo dashboard studies/quickstart.toml      optuna-dashboard on http://127.0.0.1:8080
  hpo ui studies/quickstart.toml             MLflow UI on http://127.0.0.1:5000

Results go to RUN_DIR/STUDY_NAME/ (default runs/<name>/): optuna.db (Optuna storage), mlflow.db and
mlartifacts/ (MLflow), checkpoints/trial-N/best.pt. Every command that reads a study takes the same
--run-dir/--storage/--tracking-uri options as `hpo run`.
"""

EXAMPLES_RUN = """\
examples:
  hpo run studies/quickstart.toml
  hpo run studies/quickstart.toml --trials 30 --set pruner.name=hyperband
  hpo run studies/cifar10.toml --storage postgresql://user:pw@db:5432/hpo --tracking-uri http://mlflow:5000
  hpo run studies/quickstart.toml --set space.lr.high=0.05 --set early_stopping.patience=3

Running the same command again resumes the study: the budget counts finished trials in the storage.
"""


def _common(p: argparse.ArgumentParser, file_required: bool = True) -> None:
    if file_required:
        p.add_argument("file", metavar="FILE", help="study file (TOML), e.g. studies/quickstart.toml")
    else:
        p.add_argument("file", metavar="FILE", nargs="?", help="study file (TOML); or give --study")
        p.add_argument("--study", metavar="NAME", help="study name, when no FILE is given")
    p.add_argument("--run-dir", default="runs", metavar="DIR",
                   help="parent folder of per-study result folders (default: runs)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL: sqlite:///path.db, postgresql://..., mysql+pymysql://..., "
                        "or journal:PATH (default: sqlite file in the run directory)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI: sqlite:///path.db or http://host:port "
                        "(default: mlflow.db in the run directory)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a study-file key, validated like the file; repeatable")
    p.add_argument("--study-name", metavar="NAME", help="use this study name instead of the file's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run (or resume) a study until its trial budget is met",
                         description="Run or resume a study until n_trials trials have finished.",
                         epilog=EXAMPLES_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--trials", type=int, metavar="N", help="total finished trials wanted (overrides n_trials)")
    run.add_argument("--timeout", type=float, metavar="S", help="stop starting new trials after S seconds")
    run.add_argument("--quiet", action="store_true", help="no per-trial progress lines")

    status = sub.add_parser("status", help="table of a study's trials and its best trial")
    _common(status, file_required=False)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    best = sub.add_parser("best", help="the best trial: value, parameters, checkpoint, test accuracy")
    _common(best, file_required=False)
    best.add_argument("--json", action="store_true", help="print JSON")

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on the study's storage (127.0.0.1)")
    _common(dash, file_required=False)
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no authentication!)")
    dash.add_argument("--port", type=int, default=8080)

    ui = sub.add_parser("ui", help="serve the MLflow UI on the study's tracking store (127.0.0.1)")
    _common(ui, file_required=False)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no authentication!)")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def _settings(args: argparse.Namespace) -> Any:
    from search.config import load_settings

    overrides = list(args.overrides)
    if args.study_name:
        overrides.append(f"study.name={json.dumps(args.study_name)}")
    return load_settings(args.file, overrides)


def _paths(args: argparse.Namespace) -> tuple[Any, Any]:
    """(settings or None, RunPaths) for commands that read a study from FILE or --study NAME."""
    from search.study import run_paths

    if args.file:
        settings = _settings(args)
        name = settings.study.name
    else:
        settings = None
        name = args.study_name or getattr(args, "study", None)
        if not name:
            raise SettingsError("give a study FILE or --study NAME (see hpo status --help)")
    return settings, run_paths(args.run_dir, name, args.storage, args.tracking_uri)


def _open_existing(args: argparse.Namespace) -> Any:
    import optuna

    from search.study import open_storage

    settings, paths = _paths(args)
    name = settings.study.name if settings else (args.study_name or args.study)
    if paths.storage_url.startswith("sqlite:///") and not Path(paths.storage_url[10:]).exists():
        raise SettingsError(f"no results for study {name!r} yet: {paths.storage_url[10:]} does not exist. "
                            "Run `hpo run FILE` first, or pass the --run-dir/--storage it used.")
    storage = open_storage(paths.storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage), paths
    except KeyError as exc:
        raise SettingsError(f"the storage {paths.storage_url} has no study named {name!r}.") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from search.progress import Progress
    from search.study import run_paths, run_study
    from search.summary import best_trial, counts, epochs_spent, study_table

    settings = _settings(args)
    paths = run_paths(args.run_dir, settings.study.name, args.storage, args.tracking_uri)
    n_trials = args.trials if args.trials is not None else settings.study.n_trials
    progress = None if args.quiet else Progress(n_trials, settings.study.metric)
    print(f"study {settings.study.name!r}: {settings.sampler.name} sampler, {settings.pruner.name} pruner, "
          f"early stopping {'on' if settings.early_stopping.enabled else 'off'}, budget {n_trials} trials "
          f"x {settings.study.max_epochs} epochs; results in {paths.root}", file=sys.stderr)
    result = run_study(settings, paths, n_trials=args.trials, timeout=args.timeout, progress=progress)
    study = result.study
    c = counts(study)
    print(study_table(study))
    print()
    print(f"finished {c['COMPLETE'] + c['PRUNED']} trials ({c['COMPLETE']} complete, {c['PRUNED']} pruned, "
          f"{c['FAIL']} failed); {result.new_trials} new in this run; {epochs_spent(study)} epochs spent of "
          f"{len(study.trials) * settings.study.max_epochs} without early stopping or pruning")
    best = best_trial(study)
    if best is not None:
        test = ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items())
        print(f"best trial #{best.number}: {settings.study.metric} {best.value:.4f}"
              f"{'; ' + test if test else ''}; params {best.params}")
    _print_where(args, paths)
    if result.stopped_by_failures:
        print(f"error: the study stopped after {settings.study.max_failures} failed trials in a row; last "
              f"reason: {result.stopped_by_failures}. Fix the cause (see `hpo status`) and run again.",
              file=sys.stderr)
        return 1
    return 0


def _print_where(args: argparse.Namespace, paths: Any) -> None:
    target = args.file if args.file else f"--study {paths.root.name}"
    extra = "" if args.run_dir == "runs" else f" --run-dir {args.run_dir}"
    if args.storage:
        extra += f" --storage {args.storage}"
    if args.tracking_uri:
        extra += f" --tracking-uri {args.tracking_uri}"
    print(f"""
results:    {paths.root}
  Optuna:   {paths.storage_url}
  MLflow:   {paths.tracking_uri} (artifacts in {paths.artifacts})
open them:
  hpo dashboard {target}{extra}    # optuna-dashboard, http://127.0.0.1:8080
  hpo ui {target}{extra}           # MLflow UI, http://127.0.0.1:5000
  hpo status {target}{extra}       # this table again""")


def cmd_status(args: argparse.Namespace) -> int:
    from search.summary import best_trial, counts, study_table, trial_row

    study, _ = _open_existing(args)
    best = best_trial(study)
    if args.json:
        data = {"study": study.study_name, "counts": counts(study),
                "best": trial_row(best) if best else None,
                "trials": [trial_row(t) for t in study.get_trials(deepcopy=False)]}
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(study_table(study))
    c = counts(study)
    print(f"\n{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed, {c['RUNNING']} running")
    if best:
        print(f"best trial #{best.number}: value {best.value:.4f} params {best.params}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from search.summary import best_trial

    study, _ = _open_existing(args)
    best = best_trial(study)
    if best is None:
        print("no completed trial yet", file=sys.stderr)
        return 1
    data = {"number": best.number, "value": best.value, "params": best.params,
            "checkpoint": best.user_attrs.get("checkpoint"), "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
            "epochs_run": best.user_attrs.get("epochs_run"), "best_epoch": best.user_attrs.get("best_epoch"),
            "test_metrics": study.user_attrs.get("hpo.test_metrics", {})
            if study.user_attrs.get("hpo.test_scored_trial") == best.number else {}}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            print(f"{key:>14}: {value}")
    return 0


def _exec(argv: list[str]) -> int:
    print("$ " + " ".join(argv), file=sys.stderr)
    os.execv(argv[0], argv)
    return 0  # pragma: no cover


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise HpoError(f"{name} is not installed in this environment; run `make run` or `pip install -e .`")
    return found


def cmd_dashboard(args: argparse.Namespace) -> int:
    _, paths = _paths(args)
    argv = [_tool("optuna-dashboard"), paths.storage_url, "--host", args.host, "--port", str(args.port)]
    if paths.artifacts.exists():
        argv += ["--artifact-dir", str(paths.artifacts)]
    return _exec(argv)


def cmd_ui(args: argparse.Namespace) -> int:
    _, paths = _paths(args)
    argv = [_tool("mlflow"), "ui", "--backend-store-uri", paths.tracking_uri, "--host", args.host,
            "--port", str(args.port)]
    return _exec(argv)


COMMANDS = {"run": cmd_run, "status": cmd_status, "best": cmd_best, "dashboard": cmd_dashboard, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; run the same command again to resume the study.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
