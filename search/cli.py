"""The `hpo` command: run studies, inspect them, open optuna-dashboard and the MLflow UI."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from search.errors import HpoError, SettingsError, cannot_listen
from search.loading import collector_off

if TYPE_CHECKING:  # imported late at run time: `hpo --help` must not wait for optuna, torch and mlflow
    from collections.abc import Iterator

    import optuna

    from search.config import Settings
    from search.progress import Progress
    from search.stores import RunPaths

DESCRIPTION = """\
Hyperparameter search for PyTorch CNNs: Optuna studies with early stopping inside each trial,
pruning across trials, and MLflow tracking of every trial.

Start here (a study file's name alone, such as quickstart, is studies/quickstart.toml, in this folder or the
project's own):
  hpo run quickstart            tune a CNN on scikit-learn's digits (CPU, under a minute)
  hpo status quickstart         table of trials: state, value, epochs, why each ended
  hpo best quickstart           the best trial's parameters, value and checkpoint
  hpo dashboard quickstart      optuna-dashboard on http://127.0.0.1:8080
  hpo ui quickstart             MLflow UI on http://127.0.0.1:5000
  hpo report quickstart         offline HTML report, PNG plots, fit diagnosis of each trial
  hpo export quickstart --out best-model   the best model as an MLflow model directory

Results go to RUN_DIR/STUDY_NAME/ (default runs/<name>/): optuna.db (Optuna storage), mlflow.db and
mlartifacts/ (MLflow), checkpoints/trial-N/best.pt. Every command that reads a study takes the same
--run-dir/--storage/--tracking-uri options as `hpo run`.
"""

_own_process = False  # main() runs as the `hpo` process itself, which exits after it (tests pass argv and go on)

EXAMPLES_RUN = """\
examples:
  hpo run studies/quickstart.toml
  hpo run studies/quickstart.toml --trials 30 --set pruner.name=hyperband
  hpo run studies/quickstart.toml --workers 2        # a small CNN on a 2-core CPU: one worker per core
  hpo run studies/cifar10.toml --storage postgresql://user:pw@db:5432/hpo --tracking-uri http://mlflow:5000
  hpo run studies/quickstart.toml --set space.lr.high=0.05 --set early_stopping.patience=3

Running the same command again resumes the study: the budget counts finished trials in the storage.
"""


def _common(p: argparse.ArgumentParser, file_required: bool = True) -> None:
    if file_required:
        p.add_argument("file", metavar="FILE", help="study file (TOML), e.g. studies/quickstart.toml, or the name of "
                                                    "one in ./studies/ or the project's studies/, e.g. quickstart")
    else:
        p.add_argument("file", metavar="FILE", nargs="?",
                       help="study file (TOML), or the name of one in ./studies/ or the project's studies/, e.g. "
                            "quickstart; or leave it out and give --study NAME")
        p.add_argument("--study", metavar="NAME", help="study name, when no FILE is given")
    p.add_argument("--run-dir", default="runs", metavar="DIR",
                   help="parent folder of per-study result folders (default: runs)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL: sqlite:///path.db, postgresql://..., mysql+pymysql://..., "
                        "journal:PATH, or grpc://HOST:PORT (an `hpo storage-proxy`) (default: sqlite file in the "
                        "run directory)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI: sqlite:///path.db or http://host:port "
                        "(default: mlflow.db in the run directory)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a study-file key, validated like the file; repeatable")
    p.add_argument("--study-name", metavar="NAME", help="use this study name instead of the file's")


def _parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes on this machine (default: one per GPU x --trials-per-gpu, else 1). "
                        "On a CPU, one per core trains small models fastest")
    p.add_argument("--gpus", metavar="LIST", help="GPU ids to use, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--trials-per-gpu", type=int, default=1, metavar="K",
                   help="concurrent trials per GPU (small CNNs leave a big GPU mostly idle; default 1)")


def _pack(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pack", type=int, metavar="K",
                   help="train K trials together as one packed model (sets study.pack; 1: one at a time). "
                        "Pays on a GPU for small models (the quickstart CNN at K=8: 2.4x-3.5x the images per "
                        "second on an H100; one trial with objective.cuda_graphs=true: 3.3x); about even on a CPU, "
                        "where --workers gains more")


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
    _parallel(run)
    _pack(run)

    worker = sub.add_parser(
        "worker", help="join a study as one worker (one per machine or GPU; see README 'Several machines')",
        description="Run trials of a shared study until its budget is met across all workers. Same options as "
                    "`hpo run`; use the same --storage (PostgreSQL for several machines) and --tracking-uri "
                    "everywhere.")
    _common(worker)
    worker.add_argument("--trials", type=int, metavar="N", help="total finished trials wanted (overrides n_trials)")
    worker.add_argument("--timeout", type=float, metavar="S", help="stop starting new trials after S seconds")
    worker.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    worker.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch in this worker")
    _pack(worker)
    worker.add_argument("--no-finish", action="store_true", help=argparse.SUPPRESS)  # set by `hpo run --workers`
    worker.add_argument("--forked", action="store_true", help=argparse.SUPPRESS)  # ... for the workers it forks

    recover = sub.add_parser(
        "recover", help="fail and re-enqueue stale RUNNING trials (for journal storages, which have no heartbeat)",
        description="Fail RUNNING trials that started more than --older-than seconds ago (and whose worker is "
                    "not alive on this machine), end their MLflow runs KILLED and re-enqueue them with the same "
                    "params; the next `hpo run` resumes them from their last checkpoint. RDB storages "
                    "(SQLite, PostgreSQL) do this by themselves through heartbeats.")
    _common(recover, file_required=False)
    recover.add_argument("--older-than", type=float, default=3600, metavar="S",
                         help="age in seconds past which a RUNNING trial counts as stale (default 3600)")

    proxy = sub.add_parser(
        "storage-proxy", help="serve a database storage to many workers over gRPC (workers use --storage grpc://...)",
        description="Optuna's gRPC storage proxy with hpo's budget lock: workers given --storage grpc://HOST:PORT "
                    "talk to this one process, which alone holds connections to the database (see README 'Several "
                    "machines'). Needs grpcio (pip install 'hpo-service[grpc]').")
    proxy.add_argument("--storage", required=True, metavar="URL",
                       help="the database: postgresql://..., mysql+pymysql://... or sqlite:///PATH")
    proxy.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no authentication!)")
    proxy.add_argument("--port", dest="proxy_port", type=int, default=13000,
                       help="port (default 13000; 0: a free one, printed)")
    proxy.add_argument("--threads", type=int, metavar="N", help="server threads; each waiting worker holds one, so "
                       "more than the number of workers (default 512)")

    status = sub.add_parser("status", help="table of a study's trials and its best trial",
                            description="Print a study's trials (state, value, epochs, how each ended, parameters), "
                                        "the counts and the best trial; works while the study runs.")
    _common(status, file_required=False)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--watch", action="store_true",
                        help="refresh the table every --interval seconds until the study's trial budget is met "
                             "and no trial is running (for a second terminal, or workers elsewhere); Ctrl-C stops")
    status.add_argument("--interval", type=float, default=5.0, metavar="S",
                        help="seconds between refreshes with --watch (default 5)")

    best = sub.add_parser("best", help="the best trial: value, parameters, checkpoint, test accuracy",
                          description="Print the best trial: its value, parameters, checkpoint path, MLflow run, "
                                      "epochs and test metrics.")
    _common(best, file_required=False)
    best.add_argument("--json", action="store_true",
                      help="print JSON; host, checkpoint_here and checkpoint_note say whose disk holds the checkpoint")

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on the study's storage (127.0.0.1)",
                          description="Serve optuna-dashboard on one study (FILE or --study NAME), or with only "
                                      "--storage URL on every study in that storage.")
    _common(dash, file_required=False)
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no authentication!)")
    dash.add_argument("--port", type=int, default=8080, help="port (default 8080)")

    ui = sub.add_parser("ui", help="serve the MLflow UI on the study's tracking store (127.0.0.1)",
                        description="Serve the MLflow UI on a study's tracking store (FILE or --study NAME), or "
                                    "with only --tracking-uri URI on that store (every experiment in it).")
    _common(ui, file_required=False)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no authentication!)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.add_argument("--workers", type=int, default=1, metavar="N",
                    help="server processes (default 1: enough for one person, and it starts faster)")

    report = sub.add_parser("report", help="HTML report (Optuna plots, epochs by outcome, fit diagnosis) and PNGs",
                            description="Write a self-contained HTML report and PNG plots of a study, label each "
                                        "completed trial's fit, and log the PNGs on the study's MLflow run.")
    _common(report, file_required=False)
    report.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/NAME/report)")
    report.add_argument("--no-mlflow", action="store_true", help="do not log plots and fit tags in MLflow")

    export = sub.add_parser("export", help="write the best trial's model as an MLflow model directory",
                            description="Write the best trial's model as an MLflow model (pytorch and pyfunc "
                                        "flavours, signature, input example), loadable with "
                                        "mlflow.pyfunc.load_model(DIR) without this project. It takes float32 "
                                        "images (N, C, H, W) at the data set's own pixel scale (0..255 for image "
                                        "folders, not 0..1; normalisation is inside) and predicts class indices. "
                                        "The command prints the exact input and, for an image folder, how to "
                                        "turn a file into it; see README 'Export'.")
    _common(export, file_required=False)
    export.add_argument("--out", metavar="DIR", required=True, help="new (or empty) folder for the model")
    compare = sub.add_parser(
        "compare", help="the study once per pruning / early-stopping strategy and seed: table, CSV, chart",
        description="Run the study once per strategy and seed (same sampler seed per repeat, same space and\n"
                    "trial budget), each as its own study <name>-cmp-<strategy>-s<seed> in one storage, and\n"
                    "write a Markdown table, a CSV and a PNG chart of best-so-far val accuracy against epochs\n"
                    "spent. Running it again resumes. --replay applies the strategies to the recorded curves\n"
                    "of the 'none' studies instead of training (seconds; see README 'Comparing strategies').",
        epilog="examples:\n  hpo compare studies/quickstart.toml --seeds 3\n"
               "  hpo compare studies/quickstart.toml --strategies none,median+early_stopping --trials 8 --seeds 1\n"
               "  hpo compare studies/quickstart.toml --seeds 3 --replay",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(compare)
    compare.add_argument("--strategies", metavar="LIST",
                         help="comma-separated; each 'none', 'early_stopping', a pruner, or pruner+early_stopping "
                              "(default: none,early_stopping,median,median+early_stopping,hyperband,"
                              "median_carry_forward+early_stopping)")
    compare.add_argument("--seeds", type=int, default=3, metavar="K",
                         help="repeats (default 3); repeat i uses sampler seed (the file's seed + i) for every "
                              "strategy")
    compare.add_argument("--trials", type=int, metavar="N", help="finished trials per study (default: n_trials)")
    compare.add_argument("--out", metavar="DIR", help="where compare.md/.csv/.png go (default: RUN_DIR/NAME-compare)")
    compare.add_argument("--replay", action="store_true",
                         help="no training: replay the recorded curves of the 'none' studies (run first if missing)")
    compare.add_argument("--source", metavar="STUDY",
                         help="with --replay: replay this study's curves (in the same storage) instead")
    compare.add_argument("--register-models", action="store_true",
                         help="register each study's best model in the MLflow model registry (off: the models are "
                              "logged on their runs, but dozens of comparison studies would flood the registry)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, with --study-name as one more."""
    overrides = list(args.overrides)
    if getattr(args, "pack", None) is not None:
        overrides.append(f"study.pack={args.pack}")
    if args.study_name:
        overrides.append(f"study.name={json.dumps(args.study_name)}")
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    from search.config import load_settings

    return load_settings(args.file, _overrides(args))


@contextlib.contextmanager
def _progress(args: argparse.Namespace, settings: Settings, n_trials: int | None) -> Iterator[Progress | None]:
    """The run's progress bars or lines (none with --quiet), closed however the run ends."""
    from search.progress import Progress

    progress = None if args.quiet else Progress(n_trials, settings.study.metric, max_epochs=settings.study.max_epochs)
    try:
        yield progress
    finally:
        if progress is not None:
            progress.close()


def _paths(args: argparse.Namespace) -> tuple[Settings | None, RunPaths]:
    """(settings or None, RunPaths) for commands that read a study from FILE or --study NAME."""
    from search.stores import run_paths

    if args.file:
        settings = _settings(args)
        name = settings.study.name
    else:
        settings = None
        name = str(args.study_name or getattr(args, "study", None) or "")
        if not name:
            raise SettingsError(f"give a study FILE or --study NAME (see hpo {args.command} --help)")
    return settings, run_paths(args.run_dir, name, args.storage, args.tracking_uri)


def _results_elsewhere(args: argparse.Namespace, name: str) -> str:
    """When the default run directory under the current directory has no study NAME but one next to the study
    file (or up to two folders above it) has: that --run-dir is relative to where hpo runs, not to the study
    file as data_dir is. The sentence that says so and what to do, else ""."""
    if not getattr(args, "file", None) or args.storage or Path(args.run_dir).is_absolute():
        return ""
    here = (Path(args.run_dir) / name).resolve()
    start = Path(args.file).resolve().parent
    for folder in (start, *start.parents[:2]):
        candidate = folder / args.run_dir / name
        if candidate.resolve() != here and (candidate / "optuna.db").is_file():
            return (f"The run directory ({args.run_dir}/) is relative to the current directory, not to the study "
                    f"file; this study's results are in {candidate}: run hpo from {folder}, or pass --run-dir "
                    f"{folder / args.run_dir}.")
    return ""


def _stamped_storage(args: argparse.Namespace, paths: RunPaths) -> str:
    """When the study folder is stamped with another storage's study (--storage left out or wrong for workers on a
    PostgreSQL storage): the sentence that names that storage, else ""."""
    from search.run_dir import read_stamp
    from search.stores import redact

    stamp = read_stamp(paths.root)
    if stamp is None or stamp.storage == redact(paths.storage_url):
        return ""
    password = " (with the password where *** stands)" if "***" in stamp.storage else ""
    return (f"The folder {paths.root} holds study {stamp.study_name!r} of the storage {stamp.storage}: pass "
            f"--storage {stamp.storage}{password}, as its runs did.")


def _open_existing(args: argparse.Namespace) -> tuple[optuna.Study, RunPaths]:
    import optuna

    from search.records import STUDY_ID
    from search.run_dir import check_folder
    from search.stores import open_storage, redact, sqlite_path

    _, paths = _paths(args)
    name = paths.study_name
    db = sqlite_path(paths.storage_url)
    if db is not None and not db.exists():
        fix = (_stamped_storage(args, paths) or _results_elsewhere(args, name)
               or "Run `hpo run FILE` first, or pass the --run-dir/--storage it used.")
        raise SettingsError(f"no results for study {name!r} yet: {db} does not exist. {fix}")
    storage = open_storage(paths.storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as exc:
        import difflib

        names = sorted(s.study_name for s in storage.get_all_studies())
        close = difflib.get_close_matches(name, names, n=1)
        there = (f"{f'Did you mean {close[0]!r}? ' if close else ''}It holds {', '.join(map(repr, names[:20]))}"
                 f"{' and more' if len(names) > 20 else ''}: pass one as --study NAME (or --study-name NAME)"
                 if names else "It holds no study at all")
        fix = _stamped_storage(args, paths) or "Or pass the --storage the study was run with."
        raise SettingsError(f"the storage {redact(paths.storage_url)} has no study named {name!r}. {there}. {fix}"
                            ) from exc
    check_folder(paths, study.user_attrs.get(STUDY_ID))  # reports, exports and recoveries use the folder too
    return study, paths


def _loading() -> contextlib.AbstractContextManager[None]:
    """torch, mlflow, optuna and the objective load with the collector off; in the `hpo` process what was loaded
    is then frozen, so the collections of the run that follows skip it."""
    return collector_off(freeze=_own_process)


def cmd_run(args: argparse.Namespace) -> int:
    with _loading():
        from search.launch import plan_workers, run_parallel
        from search.notes import epoch_account
        from search.records import best_trial
        from search.stores import run_paths
        from search.study import run_study
        from search.summary import failed_text, state_counts, study_table

        settings = _settings(args)
    paths = run_paths(args.run_dir, settings.study.name, args.storage, args.tracking_uri)
    _check_destinations(args)
    _proxy_note(paths.storage_url)
    n_trials = args.trials if args.trials is not None else settings.study.n_trials
    plan = plan_workers(args.workers, args.gpus, args.trials_per_gpu)
    epochs, timeout = settings.study.max_epochs, args.timeout if args.timeout is not None else settings.study.timeout
    of_epochs = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    budget = (f"{n_trials} trial{'s' if n_trials != 1 else ''} x {of_epochs}" if n_trials is not None
              else f"trials of {of_epochs}")
    budget += "" if timeout is None else f", started for {timeout:g} s"
    with _progress(args, settings, n_trials) as progress:
        print(f"study {settings.study.name!r}: {settings.sampler.name} sampler, {settings.pruner.name} pruner, "
              f"early stopping {'on' if settings.early_stopping.enabled else 'off'}, budget {budget}, "
              f"{plan.describe()}; results go to {paths.root}", file=sys.stderr)
        elsewhere = "" if paths.root.exists() else _results_elsewhere(args, settings.study.name)
        if elsewhere:
            print(f"note: {paths.root} is a new folder, so this is a new study. {elsewhere}", file=sys.stderr)
        if len(plan.workers) > 1:
            result = run_parallel(settings, paths, args, plan, n_trials, progress)
        else:
            result = run_study(settings, paths, n_trials=args.trials, timeout=args.timeout, progress=progress)
    study = result.study
    trials = study.get_trials(deepcopy=False)
    c, failed = state_counts(trials), failed_text(trials)
    print(study_table(study))
    print()
    finished, acc = c["COMPLETE"] + c["PRUNED"], epoch_account(trials, settings.study.max_epochs)
    print(f"finished {finished} trial{'s' if finished != 1 else ''} ({c['COMPLETE']} complete, {c['PRUNED']} pruned, "
          f"{failed}); {result.new_trials} new in this run; {acc.spent} epochs spent of {acc.full} without early "
          "stopping or pruning")
    if result.new_trials == 0 and n_trials is not None and finished >= n_trials:  # a rerun that had nothing to do
        print(f"note: {_budget_met(n_trials, finished)}", file=sys.stderr)
    best = best_trial(study)
    if best is not None:
        test = ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items())
        print(f"best trial #{best.number}: {settings.study.metric} {best.value:.4f}"
              f"{'; ' + test if test else ''}; params {best.params}")
    from search import records

    _print_where(args, paths, exportable=study.user_attrs.get(records.MODEL_TRIAL) is not None)
    if result.stopped_by_failures:
        print(f"error: the study stopped after {settings.study.max_failures} failed trials in a row; the last one "
              f"failed with {_reason(result.stopped_by_failures)}. Fix the cause (`hpo status` shows each failed "
              "trial's reason) and run the same command again; the finished trials are saved.", file=sys.stderr)
        return 1
    if result.workers_failed:
        from search.launch import exit_text

        ended = "; ".join(f"worker process {i} of {len(plan.workers)} {exit_text(code)}"
                          for i, code in sorted(result.workers_failed.items()))
        print(f"error: {ended} (a worker's own messages are above); the finished trials are saved. Fix the cause "
              "and run the same command again to finish the budget.", file=sys.stderr)
        return 1
    return 0


def _budget_met(n_trials: int, finished: int) -> str:
    """Why a run or worker trained nothing: the study's budget was met before it started."""
    return (f"the study's budget of {n_trials} finished trial{'s' if n_trials != 1 else ''} (study.n_trials or "
            f"--trials) was met before this run, so it trained none; give --trials with more than {finished} to run "
            "more, or --study-name NAME for a new study")


def cmd_worker(args: argparse.Namespace) -> int:
    with _loading():
        from search.stores import run_paths
        from search.study import run_study
        from search.workers import set_threads

        set_threads(args.threads)
        settings = _settings(args)
    paths = run_paths(args.run_dir, settings.study.name, args.storage, args.tracking_uri)
    _check_destinations(args)
    _proxy_note(paths.storage_url)
    n_trials = args.trials if args.trials is not None else settings.study.n_trials
    with _progress(args, settings, n_trials) as progress:
        result = run_study(settings, paths, n_trials=args.trials, timeout=args.timeout, progress=progress,
                           finish=not args.no_finish, describe=not args.forked)  # a forked worker's launcher did
    if not args.no_finish:  # not for the workers of `hpo run --workers`: their launcher reports the end
        from search.summary import counts

        ran, why = result.new_trials, ""
        if ran == 0 and n_trials:  # only then are the study's trials read again, to say why
            c = counts(result.study)
            finished = c["COMPLETE"] + c["PRUNED"]
            why = f"; {_budget_met(n_trials, finished)}" if finished >= n_trials else ""
        print(f"worker done: ran {ran} trial{'s' if ran != 1 else ''} of study {settings.study.name!r}{why}",
              file=sys.stderr)
    if result.stopped_by_failures:
        print(f"error: stopped after {settings.study.max_failures} failed trials in a row; the last one failed with "
              f"{_reason(result.stopped_by_failures)}. Fix the cause and start the worker again.", file=sys.stderr)
        return 1
    return 0


def _reason(recorded: str) -> str:
    """A trial's recorded reason inside a sentence: 'error: X: msg.' -> 'X: msg' (no doubled 'error:' or '..')."""
    from search.records import reason_text

    return reason_text(recorded).rstrip(". ")


def _proxy_note(url: str) -> None:
    """Workers behind a storage proxy have no heartbeat: say so, once, as they start."""
    from search.proxy import WORKER_NOTE, is_grpc

    if is_grpc(url):
        print("note: " + WORKER_NOTE.format(url=url), file=sys.stderr)


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    from search.preflight import check_storage_url
    from search.proxy import DEFAULT_THREADS, is_grpc, serve

    if not 0 <= args.proxy_port <= 65535:
        raise SettingsError(f"--port {args.proxy_port}: a TCP port is a number from 1 to 65535, or 0 for a free one.")
    if not is_grpc(args.storage):  # serve() refuses a proxy in front of a proxy
        check_storage_url(args.storage)
    return serve(args.storage, args.host, args.proxy_port, args.threads or DEFAULT_THREADS)


def cmd_recover(args: argparse.Namespace) -> int:
    from search.tracking import Tracker, mark_killed
    from search.workers import recover_older_than

    study, paths = _open_existing(args)
    tracker = Tracker(paths.tracking_uri, study.study_name, paths.artifacts)
    numbers = recover_older_than(study, args.older_than, on_fail=lambda t: mark_killed(tracker, t, "stale_recovered"))
    if numbers:
        print(f"failed and re-enqueued trials {numbers}; run `hpo run` to resume them")
    else:
        print(f"no RUNNING trial older than {args.older_than:.0f} s whose worker is gone")
    return 0


def hpo_command() -> str:
    """How to call hpo again from the user's shell: ``hpo`` when that name on PATH is this install, else the path of
    this install's script (``.venv/bin/hpo`` after `make run`, which does not activate the venv)."""
    started = Path(sys.argv[0])
    script = started if started.name == "hpo" else Path(sys.executable).parent / "hpo"  # else `python -m search.cli`
    on_path = shutil.which("hpo")
    if not script.is_file() or (on_path and Path(on_path).resolve() == script.resolve()):
        return "hpo"
    script = script.absolute()
    return shlex.quote(str(script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script))


def _print_where(args: argparse.Namespace, paths: RunPaths, exportable: bool = True) -> None:
    """Where the results are, and the commands that open them: the study file as the user named it (`quickstart`
    stays `quickstart`), with the options that find this study again (its name too, if --set or --study-name
    changed it), as this shell can run them. Export only when a best model was logged (none for a study without
    a complete trial, or for a custom training loop, whose model hpo cannot rebuild)."""
    target = shlex.quote(getattr(args, "file_given", args.file)) if args.file else f"--study {paths.root.name}"
    renamed = any(o.partition("=")[0].strip() == "study.name" for o in _overrides(args))
    extra = f" --study-name {shlex.quote(paths.study_name)}" if args.file and renamed else ""
    extra += "" if args.run_dir == "runs" else f" --run-dir {args.run_dir}"
    if args.storage:
        extra += f" --storage {args.storage}"
    if args.tracking_uri:
        extra += f" --tracking-uri {args.tracking_uri}"
    from search.stores import redact

    hpo = hpo_command()
    export = (f"\n  {hpo} export {target}{extra} --out best-model    # the best model as an MLflow model directory"
              if exportable else "")
    if paths.tracking_uri.startswith(("http://", "https://")):  # `hpo ui` refuses a server: it serves the UI itself
        from search.tracking import existing_tracker, experiments_url

        tracker = existing_tracker(paths.tracking_uri, paths.study_name)
        stored = "artifacts on that server"
        ui = (f"open {experiments_url(paths.tracking_uri, tracker.experiment_id if tracker else None)}    "
              "# MLflow UI: the tracking server serves it")
    else:
        stored = f"artifacts in {paths.artifacts}"
        ui = f"{hpo} ui {target}{extra}           # MLflow UI, http://127.0.0.1:5000"
    print(f"""
results:    {paths.root}
  Optuna:   {redact(paths.storage_url)}
  MLflow:   {paths.tracking_uri} ({stored})
open them:
  {hpo} dashboard {target}{extra}    # optuna-dashboard, http://127.0.0.1:8080
  {ui}
  {hpo} report {target}{extra}       # HTML report and PNG plots in {paths.root / 'report'}{export}
  {hpo} status {target}{extra}       # this table again""")


def cmd_status(args: argparse.Namespace) -> int:
    from search.records import best_trial
    from search.summary import counts, trial_row
    from search.watch import status_text, watch

    if args.watch and args.json:
        raise SettingsError("--watch refreshes a table for people; leave out --json (or poll `hpo status --json`).")
    study, _ = _open_existing(args)
    if args.watch:
        return watch(study, args.interval)
    if args.json:
        best = best_trial(study)
        data = {"study": study.study_name, "counts": counts(study),
                "best": trial_row(best) if best else None,
                "trials": [trial_row(t) for t in study.get_trials(deepcopy=False)]}
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(status_text(study))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from search import records
    from search.records import best_trial
    from search.summary import counts

    study, _ = _open_existing(args)
    best = best_trial(study)
    if best is None:
        c = counts(study)
        print(f"error: study {study.study_name!r} has no completed trial yet ({c['PRUNED']} pruned, {c['FAIL']} "
              f"failed, {c['RUNNING']} running, {c['WAITING']} waiting), so it has no best trial. See why the trials "
              "ended with `hpo status`, then run (or resume) the study with `hpo run`.", file=sys.stderr)
        return 1
    attrs = best.user_attrs
    data = {"number": best.number, "value": best.value, "params": best.params,
            **{key: attrs.get(key) for key in (records.CHECKPOINT, records.MLFLOW_RUN_ID, records.EPOCHS_RUN,
                                               records.BEST_EPOCH)},
            "test_metrics": records.test_metrics(study, best)}
    elsewhere = _checkpoint_elsewhere(attrs)
    if args.json:  # a script learns what the text's note says: whose disk holds the checkpoint, and if it is here
        path = attrs.get(records.CHECKPOINT)
        data.update(host=attrs.get("host"), checkpoint_here=path is not None and Path(path).is_file(),
                    checkpoint_note=elsewhere)
        print(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            print(f"{key:>14}: {value}{f' ({elsewhere})' if key == records.CHECKPOINT and elsewhere else ''}")
    return 0


def _checkpoint_elsewhere(attrs: dict[str, Any]) -> str | None:
    """Why the best trial's checkpoint path is not a file to use on this machine (None when it is): with workers
    on several machines, each keeps the checkpoints of its own trials, and the path names the other one's disk."""
    from search import records
    from search.workers import HOST

    path, host = attrs.get(records.CHECKPOINT), attrs.get("host")
    other = host is not None and host != HOST
    if not path:
        return None
    if Path(path).is_file():
        return f"written on {host}; a file is at this path here too" if other else None
    fetch = ("`hpo export` fetches it from MLflow" if attrs.get(records.MLFLOW_RUN_ID)
             else "its trial has no MLflow run to fetch it from")
    return f"on {host}, not this machine; {fetch}" if other else f"not found on this machine; {fetch}"


def _exec(argv: list[str]) -> int:
    print("$ " + " ".join(argv), file=sys.stderr)
    os.execv(argv[0], argv)
    return 0  # pragma: no cover


def _check_port_free(host: str, port: int) -> None:
    """`mlflow ui` on a port in use logs uvicorn's error and exits 0, after hpo printed where to open it: bind
    the port once first and say so in one paragraph, as `hpo dashboard` does."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise cannot_listen(host, port, exc) from exc


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise HpoError(f"{name} is not installed in this environment; run `make run` or `pip install -e .`")
    return found


def _names_a_study(args: argparse.Namespace) -> bool:
    return bool(args.file or args.study or args.study_name)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from search.dashboard import serve

    if not _names_a_study(args):
        if not args.storage:
            raise SettingsError("give a study FILE or --study NAME for one study, or --storage URL for every study "
                                "in a storage (see hpo dashboard --help).")
        return serve(args.storage, None, args.host, args.port, run_dir=Path(args.run_dir).resolve())
    _, paths = _paths(args)
    return serve(paths.storage_url, paths.root, args.host, args.port)


def cmd_ui(args: argparse.Namespace) -> int:
    from search.stores import sqlite_path
    from search.tracking import existing_tracker, experiments_url

    name = None
    if not _names_a_study(args):
        if not args.tracking_uri:
            raise SettingsError("give a study FILE or --study NAME, or --tracking-uri URI to open every experiment "
                                "in a tracking store (see hpo ui --help).")
        uri = args.tracking_uri
    else:
        _, paths = _paths(args)
        uri, name = paths.tracking_uri, paths.study_name
    if uri.startswith(("http://", "https://")):
        raise SettingsError(f"{uri} is an MLflow tracking server, which serves the UI itself: open "
                            f"{experiments_url(uri)} in a browser instead of starting another one.")
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise SettingsError(f"no MLflow results here yet: {db} does not exist. Run "
                            "`hpo run FILE` first, or pass the --run-dir/--tracking-uri it used.")
    _check_port_free(args.host, args.port)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{shown}:{args.port}"
    tracker = existing_tracker(uri, name) if name else None  # for a link straight to the study's runs
    experiment = tracker.experiment_id if tracker else None
    where = (f"the study's runs: {experiments_url(base, experiment)}" if experiment
             else f"its experiments: {experiments_url(base)}")
    print(f"MLflow UI on {base}/ for {uri}; open {where} (the model-training view)", file=sys.stderr)
    argv = [_tool("mlflow"), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
            "--workers", str(args.workers)]
    return _exec(argv)


def cmd_report(args: argparse.Namespace) -> int:
    from search.report import write_report

    if args.out:
        from search.preflight import check_out_dir

        check_out_dir(args.out)
    study, paths = _open_existing(args)
    report = write_report(study, paths.tracking_uri, Path(args.out) if args.out else paths.root / "report",
                          log_to_mlflow=not args.no_mlflow)
    labels = ", ".join(f"#{f.trial.number} {f.diagnosis.label}" for f in report.fits if f.diagnosis)
    print(f"report: {report.html}\nplots:  {', '.join(p.name for p in report.pngs)} (in {report.html.parent})")
    print(f"fit:    {labels or 'no completed trial'}")
    if report.logged_to:
        print(f"logged the plots and report on MLflow run {report.logged_to} (artifacts plots/ and report/)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search.export import export_best
    from search.preflight import check_out_dir
    from search.study import stored_settings

    check_out_dir(args.out)
    study, paths = _open_existing(args)
    settings = _settings(args) if args.file else stored_settings(study)
    done = export_best(study, settings, Path(args.out), paths.tracking_uri)
    shape = f"float32 (N, {', '.join(map(str, done.input_shape))})"
    lines = [f"exported trial #{done.trial} (value {done.value:.4f}) to {done.out}, an MLflow model; load it with "
             f"mlflow.pyfunc.load_model({str(done.out)!r})",
             f"  input:       {done.input_info.get('input', shape)}"]
    if "image_files" in done.input_info:
        lines.append(f"  image files: {done.input_info['image_files']}")
    lines.append("  output:      class indices (int64), named by model.metadata.metadata['class_names']")
    lines.append(f"  serve it:    {serve_command(done.out)}   # POST /invocations {{\"inputs\": images}}")
    print("\n".join(lines))
    return 0


def serve_command(model: Path, port: int = 5001) -> str:
    """MLflow's scoring server for an exported model, as a shell command. `mlflow models serve` starts `uvicorn` by
    name, so the folder of this install's scripts must be on PATH (else it fails with exit code 127): the command
    puts it there unless it already is."""
    scripts = Path(sys.executable).parent
    cmd = f"mlflow models serve -m {shlex.quote(str(model))} --env-manager local --port {port}"
    found = [shutil.which(name) for name in ("mlflow", "uvicorn")]
    if all(f is not None and Path(f).parent == scripts for f in found):
        return cmd
    return f"PATH={shlex.quote(str(scripts))}:\"$PATH\" {cmd}"


COMMANDS = {"run": cmd_run, "worker": cmd_worker, "recover": cmd_recover, "status": cmd_status, "best": cmd_best,
            "storage-proxy": cmd_storage_proxy,
            "dashboard": cmd_dashboard, "ui": cmd_ui,
            "report": cmd_report, "export": cmd_export}


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a scheduler stopping the job) ends the current trial like Ctrl-C: FAIL, re-enqueued. Only the first
    SIGTERM or Ctrl-C counts; later ones are ignored, as they would cut short the recording of the interrupted trial
    (a terminal's Ctrl-C reaches `hpo run --workers` and its workers, which the command then stops with SIGTERM).
    Ignored by a Python handler that does nothing, not SIG_IGN: a signal already caught but not yet handled when
    SIG_IGN is set makes Python raise "OSError: Signal 15 ignored due to race condition". While a finished trial's
    result is being recorded the interrupt waits for the record (search/interrupts.py)."""
    from search import interrupts

    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    interrupts.signalled()
    if interrupts.noted():  # a finished trial is being recorded: raised once its record is whole
        return
    raise KeyboardInterrupt


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A signal after the first SIGTERM or Ctrl-C (see ``_terminate``)."""


def cmd_compare(args: argparse.Namespace) -> int:
    from search.compare import DEFAULT_STRATEGIES, plan_compare, replay_compare, run_compare
    from search.compare_render import write_outputs

    _check_destinations(args)
    strategies = DEFAULT_STRATEGIES if args.strategies is None else args.strategies  # '' is refused, not the default
    plan = plan_compare(args.file, _overrides(args), strategies, args.seeds, args.trials, args.run_dir, args.storage,
                        args.tracking_uri)
    if args.source and not args.replay:
        raise SettingsError("--source names the study whose curves --replay replays; add --replay")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    mode = "replaying" if args.replay else "running"
    n_strategies, n_seeds = len(plan.strategies), len(plan.seeds)
    strategies = f"{n_strategies} strateg{'ies' if n_strategies != 1 else 'y'}"
    log(f"{mode} {strategies} x {n_seeds} seed{'s' if n_seeds != 1 else ''} of {plan.base.study.name!r}, "
        f"{plan.n_trials} trials x {plan.base.study.max_epochs} epochs each; studies in {plan.storage_url}")
    register: bool = args.register_models
    if not args.replay:  # a replay trains nothing (but the 'none' studies it may have to run first)
        log("best models are logged on their MLflow runs and registered in the model registry (--register-models)"
            if register else "best models are logged on their MLflow runs but not registered (--register-models "
            "registers them)")
    rows = replay_compare(plan, args.source, log, register) if args.replay else run_compare(plan, log, register)
    paths = write_outputs(rows, plan.strategy_names, Path(args.out) if args.out else plan.root, args.replay,
                          plan.chart_title(args.replay), plan.describe(args.replay))
    print(paths["md"].read_text())
    print(f"written: {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0


COMMANDS["compare"] = cmd_compare


def _check_destinations(args: argparse.Namespace) -> None:
    """Before anything is created: the run directory takes files, the storage and tracking URIs can be opened."""
    from search.preflight import check_run_dir, check_storage_url, check_tracking_uri

    check_run_dir(args.run_dir)
    if args.tracking_uri:
        check_tracking_uri(args.tracking_uri)
    if args.storage:
        check_storage_url(args.storage)


def main(argv: list[str] | None = None) -> int:
    global _own_process
    from search.preflight import check_options

    _own_process = argv is None
    args = build_parser().parse_args(argv)
    if getattr(args, "file", None):  # `hpo run quickstart`: the study file of that name (config.find_study_file)
        from search.config import find_study_file

        args.file_given, args.file = args.file, find_study_file(args.file)
    if threading.current_thread() is threading.main_thread():
        from search import failures, interrupts

        interrupts.reset()
        failures.reset_shown()
        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGINT, _terminate)
        if args.command == "worker":
            interrupts.follow_launcher()
    try:
        check_options(args)
        return COMMANDS[args.command](args)
    except HpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.command not in ("run", "worker", "compare"):  # reading, reporting, serving: no trial to resume
            print("\ninterrupted.", file=sys.stderr)
        elif not getattr(args, "no_finish", False):  # the workers of `hpo run --workers`: their launcher says it once
            print("\ninterrupted: finished trials are saved; run the same command again to resume the study.",
                  file=sys.stderr)
        return 130


def exit_now(code: int) -> NoReturn:
    """Exit as ``sys.exit`` would, minus the interpreter's teardown (its garbage collections over everything
    torch, mlflow and optuna made, and every module's cleanup), 2-3 s here: after every command, and in every
    worker process. The Optuna storages are closed first: SQLite folds its WAL file back into optuna.db on the
    last close, which no teardown would do now (copying optuna.db alone would miss the latest trials). What a
    normal exit does that matters still happens, in its order: threads that are not daemons run to their end,
    then atexit handlers (queued MLflow writes, logging), then the standard streams are flushed."""
    if "search.stores" in sys.modules:  # a command that opened no storage has not imported it
        from search.stores import close_storages

        close_storages()
    if sys.getprofile() is not None:  # `python -m cProfile -m search.cli ...` writes its stats after we return
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The ``hpo`` console script."""
    exit_now(main())


if __name__ == "__main__":
    entry()
