"""`hpo compare`: the same study once per early-stopping / pruning strategy and seed, side by side.

Every strategy of one repeat gets the same sampler seed, search space, training settings and trial
budget; only the pruner and early stopping change. Each strategy x seed is its own study
(``<study>-cmp-<strategy>-s<seed>``) in one shared storage and tracking store, so the runs can be opened
with the usual commands (``hpo status --study NAME --storage ...``) and a repeated ``hpo compare``
resumes instead of retraining; one whose settings differ from those the studies were run with is refused
(``check_reuse``), since its table would mix both. With ``replay`` the strategies are applied to the recorded
curves of the ``none`` studies instead of training (see search/replay.py).

This module plans and runs, and returns one results row per strategy x seed; the table, CSV and chart
are drawn from those rows by search/compare_render.py, and the command itself is ``cmd_compare`` in
search/cli.py.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import records
from search.config import PRUNER_OPTIONS, Settings, apply_overrides, read_study, settings_from_dict
from search.errors import HpoError, SettingsError, StorageError

if TYPE_CHECKING:
    import optuna

    from search.replay import RecordedTrial

DEFAULT_STRATEGIES = "none,early_stopping,median,median+early_stopping,hyperband,median_carry_forward+early_stopping"


@dataclass(frozen=True)
class Strategy:
    """A pruner (or none) with early stopping on or off, spelled like ``median+early_stopping``."""

    name: str
    pruner: str
    early_stopping: bool
    given: str = ""  # as written in --strategies (``early_stopping+median`` is named ``median+early_stopping``)

    @property
    def slug(self) -> str:
        """The strategy as it appears in study names (which allow letters, digits, ``_ . -``)."""
        return self.name.replace("+", "-")


NONE = Strategy("none", "none", False)  # the strategy whose studies record full curves (a replay's source)


def parse_strategies(text: str) -> list[Strategy]:
    """``none,early_stopping,median+early_stopping`` -> strategies; each part is a pruner or early_stopping."""
    out: list[Strategy] = []
    for name in [s.strip() for s in text.split(",") if s.strip()]:
        parts = name.split("+")
        pruners = [p for p in parts if p not in ("early_stopping", "none")]
        unknown = [p for p in pruners if p not in PRUNER_OPTIONS]
        if unknown or len(pruners) > 1 or len(set(parts)) != len(parts):
            raise SettingsError(
                f"--strategies: {name!r} is not a strategy. Write 'none', 'early_stopping', a pruner name, or "
                f"a pruner and early stopping joined by '+' (median+early_stopping). Pruners: "
                f"{', '.join(sorted(PRUNER_OPTIONS))}."
            )
        pruner, early = (pruners[0] if pruners else "none"), "early_stopping" in parts
        # One spelling per strategy (its studies' names): the pruner first, "none" only alone.
        canonical = "+".join([pruner] * (pruner != "none") + ["early_stopping"] * early) or "none"
        twice = [s for s in out if s.name == canonical]
        if twice:
            raise SettingsError(f"--strategies names the strategy {canonical!r} twice ({name!r} is the same as "
                                f"{twice[0].given!r}); list each strategy once.")
        out.append(Strategy(canonical, pruner, early, given=name))
    if not out:
        raise SettingsError("--strategies is empty; for example --strategies none,median+early_stopping")
    return out


@dataclass(frozen=True)
class ComparePlan:
    """Everything a comparison runs, validated before anything trains."""

    base: Settings
    strategies: list[Strategy]
    seeds: list[int]
    n_trials: int
    root: Path
    storage_url: str
    tracking_uri: str
    settings: dict[tuple[str, int], Settings]
    raw: dict[str, Any] = field(default_factory=dict)

    def settings_for(self, strategy: Strategy, seed: int) -> Settings:
        """Settings of ``strategy`` at ``seed``, also for one outside the plan (the replay source)."""
        if (strategy.name, seed) not in self.settings:
            return strategy_settings(self.raw, self.base.source, self.base, strategy, seed)
        return self.settings[(strategy.name, seed)]

    @property
    def strategy_names(self) -> list[str]:
        """The strategies in the order asked for: the order of the table's lines and the chart's legend."""
        return [s.name for s in self.strategies]

    def describe(self, replay: bool) -> str:
        """The sentence above the table: which study, what budget, which seeds, trained or replayed."""
        how = ("replayed on the recorded curves of the 'none' studies (no training; time = summed recorded epoch "
               "times)" if replay else "trained for real; wall time = sum of the trials' durations")
        return (f"Study `{self.base.study.name}` ({self.base.source}): {self.n_trials} trials x "
                f"{self.base.study.max_epochs} epochs per strategy and seed, sampler seeds "
                f"{', '.join(map(str, self.seeds))}; {how}.")

    def chart_title(self, replay: bool) -> str:
        """The chart's title: the same facts as ``describe``, short."""
        seeds = len(self.seeds)
        return (f"{self.base.study.name}: {self.n_trials} trials x {self.base.study.max_epochs} epochs, "
                f"{seeds} seed{'s' if seeds > 1 else ''}{' (replay)' if replay else ''}")


def plan_compare(file: str | Path, overrides: Sequence[str], strategies: str, n_seeds: int, n_trials: int | None,
                 run_dir: str | Path = "runs", storage: str | None = None,
                 tracking_uri: str | None = None) -> ComparePlan:
    """Build and validate the settings of every strategy x seed (a bad strategy fails before any training)."""
    from search.config import load_settings
    from search.stores import run_paths

    base = load_settings(file, overrides)
    if base.study.metric != "val_accuracy":
        raise SettingsError(f"{file}: hpo compare reports validation accuracy, so it needs study.metric = "
                            f"'val_accuracy' (the file has {base.study.metric!r}).")
    if n_seeds < 1:
        raise SettingsError(f"--seeds must be at least 1, got {n_seeds}")
    trials = n_trials if n_trials is not None else base.study.n_trials
    if trials is None or trials < 1:
        raise SettingsError(f"{file}: hpo compare needs a trial budget; give --trials N (a timeout alone would "
                            "give each strategy a different number of trials).")
    raw = apply_overrides(read_study(Path(file)), overrides)
    first_seed = base.sampler.seed if base.sampler.seed is not None else 0
    seeds = [first_seed + i for i in range(n_seeds)]
    parsed = parse_strategies(strategies)
    built = {(s.name, seed): strategy_settings(raw, str(file), base, s, seed) for seed in seeds for s in parsed}
    where = run_paths(run_dir, f"{base.study.name}-compare", storage, tracking_uri)  # one store for all studies
    return ComparePlan(base, parsed, seeds, trials, where.root, where.storage_url, where.tracking_uri, built, raw)


def strategy_settings(raw: dict[str, Any], source: str, base: Settings, strategy: Strategy, seed: int) -> Settings:
    """The study file with this strategy's pruner and early stopping, this sampler seed and its own name.

    The pruner keeps the file's pruner options that the new pruner accepts (median -> median_carry_forward
    keeps n_startup_trials and n_warmup_steps; hyperband takes none of them), so shared options stay equal.
    """
    data = copy.deepcopy(raw)
    study = data.setdefault("study", {})
    study["name"] = f"{base.study.name}-cmp-{strategy.slug}-s{seed}"
    study.pop("timeout", None)  # the budget is a number of trials, the same for every strategy
    data.setdefault("sampler", {})["seed"] = seed
    old = data.get("pruner", {})
    allowed = PRUNER_OPTIONS[strategy.pruner]
    data["pruner"] = {"name": strategy.pruner, **{k: v for k, v in old.items() if k in allowed}}
    data.setdefault("early_stopping", {})["enabled"] = strategy.early_stopping
    return settings_from_dict(data, source=f"{source} [strategy {strategy.name}, seed {seed}]",
                              base_dir=Path(source).resolve().parent)  # relative paths as in the file itself


@dataclass
class Row:
    """One strategy x seed: the CSV columns, plus the best-so-far curve for the chart."""

    strategy: str
    seed: int
    best_val_accuracy: float
    test_accuracy: float
    epochs_spent: int
    budget_fraction: float
    wall_seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)


def row_for(study: optuna.Study, strategy: str, seed: int, max_epochs: int, test_accuracy: float) -> Row:
    """Summarise a finished (real or replayed) study: epochs of every trial count, pruned or not."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    spent, curve, best = 0, [], math.nan
    seconds = 0.0
    maximize = study.direction.name == "MAXIMIZE"
    for t in trials:
        spent += records.epochs_trained(t)
        if records.REPLAY_SECONDS in t.user_attrs:
            seconds += float(t.user_attrs[records.REPLAY_SECONDS])
        elif t.datetime_start and t.datetime_complete:
            seconds += (t.datetime_complete - t.datetime_start).total_seconds()
        if t.state == TrialState.COMPLETE and t.value is not None and (
            math.isnan(best) or (t.value > best if maximize else t.value < best)
        ):
            best = float(t.value)
        curve.append((spent, best))
    budget = len(trials) * max_epochs
    return Row(strategy, seed, best, test_accuracy, spent, spent / budget if budget else math.nan, seconds, curve)


def comparison_identity(settings: Settings, curves_only: bool = False) -> dict[str, Any]:
    """What a strategy x seed study's trials depend on besides its name (which holds the strategy and the seed): the
    study fingerprint (data, model, recipe, space), max_epochs and the sampler, and unless ``curves_only`` (a replay's
    source, of which only the recorded curves are read) its pruner and early stopping as they act."""
    identity = {**settings.fingerprint(), "study.max_epochs": settings.study.max_epochs}
    identity.update({f"sampler.{k}": v for k, v in settings.sampler.model_dump(exclude={"seed"}).items()})
    if not curves_only:
        identity.update({f"pruner.{k}": v for k, v in settings.pruner.model_dump().items()})
        identity.update({f"early_stopping.{k}": v for k, v in settings.early_stopping_kwargs().items()})
    return identity


def check_reuse(plan: ComparePlan, replay: bool = False, source: str | None = None) -> None:
    """Refuse, before anything trains, to resume studies of the plan that an earlier ``hpo compare`` ran with other
    settings (``comparison_identity``; for a real run also more finished trials than ``--trials``): their old trials
    would count in the new table, such as a 'none' strategy trained for 4 epochs a trial shown spending 67% of a
    6-epoch budget. Nothing is deleted; the message says how to run it elsewhere or resume with the old values. A
    replay checks only the 'none' studies it reads (not a ``source`` the user named), on what their curves depend."""
    import optuna
    from optuna.trial import TrialState

    from search.stores import open_storage, redact
    from search.study import differences, stored_settings

    if replay and source is not None:
        return
    storage = open_storage(plan.storage_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    planned = [plan.settings_for(NONE, seed) for seed in plan.seeds] if replay else list(plan.settings.values())
    conflicts: list[tuple[str, list[str]]] = []
    for settings in [s for s in planned if s.study.name in existing]:
        study = optuna.load_study(study_name=settings.study.name, storage=storage)
        try:
            old = comparison_identity(stored_settings(study), curves_only=replay)
        except HpoError:
            continue  # not made by hpo, or by a version whose settings no longer validate: nothing to compare
        diffs = differences(old, comparison_identity(settings, curves_only=replay))
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        if not replay and finished > plan.n_trials:
            diffs.append(f"number of finished trials ({finished} there, --trials {plan.n_trials} now)")
        if diffs:
            conflicts.append((settings.study.name, diffs))
    if conflicts:
        name, diffs = conflicts[0]
        more = f", and {len(conflicts) - 1} more of its studies differ" if len(conflicts) > 1 else ""
        raise StorageError(
            f"{redact(plan.storage_url)} holds this comparison's studies from an earlier `hpo compare` with other "
            f"settings: {name!r} has a different {' and '.join(diffs)}{more}. Resuming them would put the old "
            "trials in the new table, so nothing was trained. Compare the new settings in another place (--run-dir "
            "DIR, or --storage; or --set study.name=NEW, which names new studies), or give the old values (those "
            "'there') to resume the earlier comparison."
        )


def _stored_test_accuracy(study: optuna.Study) -> float:
    return records.test_metrics(study).get("test_accuracy", math.nan)


def run_compare(plan: ComparePlan, log: Callable[[str], None] = print, register: bool = False) -> list[Row]:
    """Train every strategy x seed, alternating strategies within a seed; resumes finished studies. Best models
    are logged on their runs; ``register`` also registers them (off: one version per study floods the registry)."""
    from search.stores import run_paths
    from search.study import run_study

    check_reuse(plan)
    warm_up(plan, log)
    rows = []
    total = len(plan.seeds) * len(plan.strategies)
    for i, (seed, strategy) in enumerate(((se, st) for se in plan.seeds for st in plan.strategies), start=1):
        settings = plan.settings[(strategy.name, seed)]
        paths = run_paths(plan.root, settings.study.name, plan.storage_url, plan.tracking_uri)
        started = time.perf_counter()
        result = run_study(settings, paths, n_trials=plan.n_trials, register_model=register)
        row = row_for(result.study, strategy.name, seed, settings.study.max_epochs,
                      _stored_test_accuracy(result.study))
        log(f"[{i}/{total}] {strategy.name} seed {seed}: {row.epochs_spent} epochs "
            f"({row.budget_fraction:.0%} of budget), best val acc {row.best_val_accuracy:.4f}, "
            f"{row.wall_seconds:.1f} s in trials, the table's wall time ({time.perf_counter() - started:.1f} s in "
            f"all; {result.new_trials} new trials)")
        rows.append(row)
    return rows


def warm_up(plan: ComparePlan, log: Callable[[str], None] = print) -> float | None:
    """One untimed trial of one epoch, in a scratch folder deleted after it, before the timed studies; returns
    its seconds, or None when every study of the plan has finished already (nothing will train).

    A process's first trial pays one-time costs: imports (MLflow's store code), the first kernels' set-up; about
    3 s on a 2-core CPU, more with torch.compile. Counted in the first strategy's trials only, they showed as time
    the other strategies saved (50% each, at equal epochs)."""
    import tempfile

    from search.stores import open_storage, run_paths
    from search.study import run_study

    storage = open_storage(plan.storage_url)
    if all(_has_finished(storage, s.study.name, plan.n_trials) for s in plan.settings.values()):
        return None
    first = plan.settings[(plan.strategies[0].name, plan.seeds[0])]
    scratch = first.model_copy(update={"study": first.study.model_copy(update={"max_epochs": 1})})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpo-compare-warm-up-") as folder:
        run_study(scratch, run_paths(folder, scratch.study.name, None, None), n_trials=1)
    seconds = time.perf_counter() - started
    log(f"warm-up: one untimed trial of 1 epoch ({seconds:.1f} s, in a scratch folder, now deleted), so that the "
        "process's one-time costs do not count in the first strategy's wall time")
    return seconds


def replay_compare(plan: ComparePlan, source: str | None = None, log: Callable[[str], None] = print,
                   register: bool = False) -> list[Row]:
    """Replay every strategy on the recorded curves of each seed's ``none`` study (or of ``source``).

    A missing ``none`` study is first run for real, so ``hpo compare FILE --replay`` works from scratch.
    """
    import optuna

    from search.replay import load_recorded, needed_metrics, replay, replayed_test_accuracy
    from search.stores import open_storage, run_paths
    from search.study import run_study

    check_reuse(plan, replay=True, source=source)
    storage = open_storage(plan.storage_url)
    rows = []
    for seed in plan.seeds:
        if source is not None:
            source_name = source
        else:
            source_settings = plan.settings_for(NONE, seed)
            source_name = source_settings.study.name
            if not _has_finished(storage, source_name, plan.n_trials):
                log(f"recording full curves for seed {seed}: training study {source_name!r} (strategy none)")
                run_study(source_settings, run_paths(plan.root, source_name, plan.storage_url, plan.tracking_uri),
                          n_trials=plan.n_trials, register_model=register)
        try:
            recorded_study = optuna.load_study(study_name=source_name, storage=storage)
        except KeyError as exc:
            raise SettingsError(f"the storage {plan.storage_url} has no study {source_name!r} to replay.") from exc
        cache: dict[tuple[str, ...], list[RecordedTrial]] = {}
        for strategy in plan.strategies:
            settings = plan.settings[(strategy.name, seed)]
            names = needed_metrics(settings)
            key = tuple(names)
            if key not in cache:
                cache[key] = load_recorded(recorded_study, plan.tracking_uri, names, settings.study.max_epochs)
                if len(cache[key]) < plan.n_trials:
                    log(f"note: {source_name!r} has {len(cache[key])} finished trials, fewer than the budget of "
                        f"{plan.n_trials}; the replay uses those")
            recorded = cache[key][: plan.n_trials]
            started = time.perf_counter()
            replayed = replay(recorded, settings)
            row = row_for(replayed, strategy.name, seed, settings.study.max_epochs,
                          replayed_test_accuracy(replayed, recorded, settings))
            log(f"replay {strategy.name} seed {seed} from {source_name!r}: {row.epochs_spent} epochs "
                f"({row.budget_fraction:.0%}), best val acc {row.best_val_accuracy:.4f}, "
                f"replayed in {time.perf_counter() - started:.2f} s")
            rows.append(row)
    return rows


def _has_finished(storage: optuna.storages.BaseStorage, name: str, n_trials: int) -> bool:
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return False
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return len(done) >= n_trials
