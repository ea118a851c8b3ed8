"""Per-epoch cost of the service around training, in milliseconds and as a share of an epoch.

Each epoch, a trial's session (search/session.py) queues the metrics for MLflow (search/metric_queue.py), updates
early stopping, copies the best weights when they improve, reports to Optuna (held, written every 2 s and as the
trial ends) and asks the pruner (on the trial as the session knows it, finished trials read at most every 10 s),
and writes the resumable last.pt checkpoint at most every ``checkpoint_every_seconds``. Each part is also timed
the way the previous versions did it (a report written every epoch, synchronous log_batch, a pruner given the
running trial read back, one that reads every finished trial too, last.pt every epoch), side by side. On SQLite
the report is also timed on a second study file whose connections use ``PRAGMA synchronous=NORMAL`` (no fsync per
commit), for comparison. This script times that hook (``TrialSession.on_epoch``, the real one, with a real model
and optimiser state) and each part of it on its own, for SQLite and, when a server answers, PostgreSQL storage, in
a study that already holds finished trials (so the pruner has a median to compute).
It also counts MLflow client calls per epoch, to show the metrics go in one batched call, and times the
alternative of one call per metric. The shares are against measured epoch times of the quickstart CNN on
digits and of a CNN on synthetic CIFAR-shaped data, on this machine.

    python bench/service_overhead.py
    HPO_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres python bench/service_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import torch
from mlflow.entities import Metric

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.trial_throughput import machine  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import TrainingState, fit  # noqa: E402
from search.checkpoint import save_atomic  # noqa: E402
from search.config import load_settings  # noqa: E402
from search.optuna_adapter import PruningTrial, stored_trial  # noqa: E402
from search.session import StudyContext  # noqa: E402
from search.stores import open_storage  # noqa: E402
from search.study import load_or_create_study  # noqa: E402
from search.tracking import Tracker  # noqa: E402

METRICS = ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "epoch_seconds", "images_per_second")


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * 1000, "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000}


def epoch_metrics(epoch: int) -> dict[str, float]:
    """Metrics that keep improving, so the trial is neither early-stopped nor pruned while it is measured."""
    return {"train_loss": 1.0 - 0.01 * epoch, "val_loss": 1.0 - 0.01 * epoch, "val_accuracy": 0.9 + epoch * 1e-3,
            "val_f1": 0.9 + epoch * 1e-3, "lr": 1e-3, "epoch_seconds": 0.1, "images_per_second": 1e4}


def real_state(cfg: TrainConfig) -> TrainingState:
    """A TrainingState after one real epoch (so the optimiser holds its moments, as in a running trial)."""
    captured: dict[str, TrainingState] = {}

    def keep(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        captured["state"] = state
        return True

    fit(cfg, 2, keep)
    return captured["state"]


class Counting:
    """Counts calls to some methods of a real object (the MLflow client) while passing them through."""

    def __init__(self, target: Any, names: tuple[str, ...]) -> None:
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(target, name)

            def wrapper(*a: Any, _name: str = name, _original: Callable = original, **k: Any) -> Any:
                self.counts[_name] += 1
                return _original(*a, **k)

            setattr(target, name, wrapper)


def prepopulate(study: optuna.Study, trials: int, epochs: int) -> None:
    for i in range(trials):
        t = study.ask()
        for e in range(epochs):
            t.report(0.5 + 0.01 * e + 0.01 * i, e)
        study.tell(t, 0.5 + 0.01 * epochs + 0.01 * i)


def measure_backend(label: str, storage_url: str, work: Path, state: TrainingState, args: argparse.Namespace
                    ) -> dict[str, Any]:
    """All per-epoch costs with one Optuna storage; MLflow tracking is a SQLite file in ``work``."""
    name = f"bench-overhead-{uuid.uuid4().hex[:6]}"
    settings = load_settings(REPO / "studies" / "quickstart.toml",
                             [f"study.name={json.dumps(name)}", f"study.max_epochs={args.epochs}"])
    storage = open_storage(storage_url)
    study = load_or_create_study(settings, storage)
    prepopulate(study, args.history, args.epochs)
    tracker = Tracker(f"sqlite:///{work / f'mlflow-{label}.db'}", name, work / "mlartifacts")
    parent = tracker.parent_run(name, {"bench": "service_overhead"})
    ctx = StudyContext(settings, tracker, parent, work / f"checkpoints-{label}")
    counter = Counting(tracker.client, ("log_batch", "log_metric", "log_param", "set_tag"))
    hook: list[float] = []
    calls_per_epoch: list[int] = []
    trial_end_writes: list[float] = []  # the trial's end: held steps to Optuna, merged metrics and state to MLflow
    for _ in range(args.trials):
        trial = study.ask()
        ends: list[float] = []
        with ctx.trial(trial, {"lr": 1e-3}, {"lr": 1e-3}) as session:
            assert session.run is not None and session._pruning is not None
            session.run.finish = timed(session.run.finish, ends)  # type: ignore[method-assign]
            for epoch in range(args.epochs):
                before = sum(counter.counts.values())
                start = time.perf_counter()
                stop = session.on_epoch(epoch, epoch_metrics(epoch), state)
                hook.append(time.perf_counter() - start)
                calls_per_epoch.append(sum(counter.counts.values()) - before)
                assert not stop
            session._pruning.flush = timed(session._pruning.flush, ends)  # type: ignore[method-assign]
        trial_end_writes.append(sum(ends))  # the held steps written as the trial ends, and the run's end
        study.tell(trial, 0.9)

    # the parts on their own, on a fresh trial and run
    trial = study.ask()
    run = tracker.start_trial(parent, trial.number, {"lr": 1e-3}, {})
    pruning = PruningTrial(trial)
    each_epoch = PruningTrial(study.ask(), hold=0.0)  # the previous version: a storage write every epoch
    normal = sync_normal_trial(work, label, settings) if label == "sqlite" else None
    parts: dict[str, list[float]] = {k: [] for k in ("report", "report_written_each_epoch",
                                                     "report_synchronous_normal", "should_prune_local",
                                                     "should_prune_read_back", "should_prune_uncached",
                                                     "mlflow_metrics_queued",
                                                     "mlflow_log_batch_sync", "mlflow_one_call_per_metric",
                                                     "best_weights_copy", "last_checkpoint")}
    for epoch in range(args.epochs * args.trials):
        metrics = epoch_metrics(epoch)
        ta = time.perf_counter()
        pruning.report(metrics["val_accuracy"], epoch)  # what the session does (held on SQLite: report_hold)
        te = time.perf_counter()
        each_epoch.report(metrics["val_accuracy"], epoch)
        tn = time.perf_counter()
        if normal is not None:
            normal.report(metrics["val_accuracy"], epoch)
        tb = time.perf_counter()
        pruning.should_prune()  # what the session does: the local trial, finished trials read at most every 10 s
        tr = time.perf_counter()
        trial.study.pruner.prune(pruning.view, stored_trial(trial))  # the previous version: the trial read back
        t0 = time.perf_counter()
        trial.should_prune()  # the one before: every finished trial read again
        t1 = time.perf_counter()
        run.log_epoch(epoch, metrics)  # what the session does: queued, written merged by a background thread
        t2 = time.perf_counter()
        now = int(time.time() * 1000)
        tracker.client.log_batch(run.run_id, metrics=[Metric(f"sync_{k}", float(v), now, epoch)
                                                      for k, v in metrics.items()])  # the previous version
        t2b = time.perf_counter()
        for key, value in metrics.items():
            tracker.client.log_metric(run.run_id, f"single_{key}", value, now, epoch)
        t3 = time.perf_counter()
        {k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()}
        t4 = time.perf_counter()
        save_atomic({"training": state.state_dict(), "epoch": epoch}, work / f"last-{label}.pt")
        t5 = time.perf_counter()
        spans = ((ta, te), (te, tn), (tn, tb), (tb, tr), (tr, t0), (t0, t1), (t1, t2), (t2, t2b), (t2b, t3), (t3, t4),
                 (t4, t5))
        for key, (a, b) in zip(parts, spans, strict=True):
            if normal is not None or key != "report_synchronous_normal":
                parts[key].append(b - a)
    run.flush()
    pruning.flush()
    study.tell(trial, 0.9)
    study.tell(each_epoch.trial, 0.9)
    return {"backend": label, "hook": ms(hook), "parts": {k: ms(v) for k, v in parts.items() if v},
            "trial_end_write": ms(trial_end_writes),
            "mlflow_calls_per_epoch": statistics.median(calls_per_epoch),
            "checkpoint_bytes": (work / f"last-{label}.pt").stat().st_size}


def timed(call: Any, into: list[float]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)
    return wrapper


def sync_normal_trial(work: Path, label: str, settings: Any) -> optuna.Trial:
    """A trial in a second SQLite study file (WAL, as ``open_storage`` sets it) whose connections commit with
    ``synchronous=NORMAL``: durable when the process is killed, not when the machine loses power."""
    import sqlalchemy

    storage = open_storage(f"sqlite:///{work / f'optuna-normal-{label}.db'}")
    assert isinstance(storage, optuna.storages.RDBStorage)
    sqlalchemy.event.listen(storage.engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=NORMAL"))
    storage.engine.dispose()
    return load_or_create_study(settings, storage).ask()


@contextmanager
def postgres(url: str | None) -> Iterator[str | None]:
    """A throwaway database on the server (dropped afterwards), or None when no server answers."""
    if url is None:
        try:
            socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
            url = "postgresql://postgres@127.0.0.1:5432/postgres"
        except OSError:
            yield None
            return
    import sqlalchemy

    name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no permission, wrong password: report and go on without it
        print(f"PostgreSQL at {url.split('@')[-1]} not usable ({type(exc).__name__}); skipped", file=sys.stderr)
        yield None
        return
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def epoch_seconds(cfg: TrainConfig, epochs: int = 4) -> float:
    history = fit(cfg, epochs).history
    return statistics.median(h["epoch_seconds"] for h in history[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="measured trials per backend (default 3)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per measured trial (default 20)")
    p.add_argument("--history", type=int, default=10, help="finished trials in the study beforehand (default 10)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    quick = load_settings(REPO / "studies" / "quickstart.toml").objective.model_copy(update={"batch_size": 64})
    cifar = TrainConfig(dataset="synthetic", synthetic_shape=(3, 32, 32), synthetic_train=5000, synthetic_val=500,
                        synthetic_test=100, widths=(32, 64), batch_size=64)
    epochs = {"digits quickstart CNN": epoch_seconds(quick), "synthetic 3x32x32, 5k images": epoch_seconds(cifar)}
    for k, v in epochs.items():
        print(f"epoch time, {k}: {v * 1000:.0f} ms", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp, postgres(os.environ.get("HPO_TEST_POSTGRES_URL")) as pg:
        work = Path(tmp)
        # state of the bigger model: its checkpoint is the larger, so the figure is the less flattering one
        state = real_state(cifar)
        backends = [("sqlite", f"sqlite:///{work / 'optuna.db'}")] + ([("postgresql", pg)] if pg else [])
        if not pg:
            print("PostgreSQL: no server on 127.0.0.1:5432 and no HPO_TEST_POSTGRES_URL; measured SQLite only")
        for label, url in backends:
            r = measure_backend(label, url, work, state, args)
            results.append(r)
            print(f"\n{label}: whole on_epoch hook median {r['hook']['median_ms']:.1f} ms (p90 "
                  f"{r['hook']['p90_ms']:.1f}); MLflow calls per epoch: {r['mlflow_calls_per_epoch']:.0f}; "
                  f"last.pt {r['checkpoint_bytes'] / 1024:.0f} KiB")
            for part, figures in r["parts"].items():
                print(f"  {part:<28} {figures['median_ms']:7.2f} ms  (p90 {figures['p90_ms']:.2f})")
            end = r["trial_end_write"]["median_ms"]
            per_epoch = r["hook"]["median_ms"] + end / args.epochs
            print(f"  the trial's end (held steps to Optuna; epochs' metrics, final state to MLflow): {end:.1f} ms "
                  f"a trial of "
                  f"{args.epochs} epochs, {end / args.epochs:.2f} ms an epoch")
            for k, v in epochs.items():
                print(f"  share of an epoch, {k}: {r['hook']['median_ms'] / 1000 / v:.1%} (hook), "
                      f"{per_epoch / 1000 / v:.1%} (hook + the trial's end, per epoch)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "epoch_seconds": epochs, "results": results},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
