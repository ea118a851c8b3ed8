"""Trial packing on the search side: K trials asked together and trained as packs, each still its own trial.

``study.pack = K`` (``--pack K``) makes a worker hold up to K trials at once. They are asked one by one under
the budget lock (so the budget stays exact across workers) with TPE's ``constant_liar`` on (see
``search/samplers.py``), then grouped by what their members must share (``pack_key``: for the CNN, its batch
size and architecture); each group is one pack, trained one epoch at a time, round robin. Every member opens
its own ``TrialSession``: its own report/should_prune through ``decide_epoch``, early stopping, MLflow child
run, checkpoints (``last.pt`` for resume, ``best.pt``) and user attributes, exactly as an unpacked trial.

A member that is pruned, stops early or ends leaves its pack at once (the pack shrinks), and its slot is
refilled with a new trial of the same pack key when the budget allows (``study.enqueue_trial`` with those
params; the sampler chooses the rest), so packing never spends an epoch a trial alone would not.
Before each trial is asked, ``search.study.claim_slot`` fails and re-enqueues the trials of dead or cut-off
workers, as for unpacked trials. A member that another worker failed as stale while this one trained it (its
heartbeat was missing too long) is dropped here, its MLflow run ended KILLED: the retry is the other worker's.

``study.trial_timeout``: one process alarm per pack epoch, set for its earliest member's deadline (one alarm
cannot time K trials separately). An epoch it cuts short fails the members past their deadline with reason
``trial_timeout``; the others fail with reason ``pack_interrupted`` and are re-enqueued (they resume from
``last.pt``), as Ctrl-C does. Between epochs a member past its deadline leaves its pack and fails alone.
Ctrl-C and SIGTERM fail every open member with reason ``interrupted``, end its MLflow run KILLED and re-enqueue
it, as for an unpacked trial. A storage that stops answering (``StorageUnavailable``) stops the worker and ends
every member's MLflow run KILLED (``storage_lost``), leaving the Optuna trials to the other workers.
A pack that runs out of memory fails its members with reason ``out_of_memory``, records ``oom_pack_size`` on
them, re-enqueues them (they resume from ``last.pt``) and this worker packs at most half as many from then on.

The objective takes part through two optional methods (``PackingObjective``); an objective without them runs
its trials one at a time, with a one-line note.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import interrupts, records
from search.failures import (
    EpochCutShort,
    TrialFailed,
    TrialInterrupted,
    TrialTakenOver,
    TrialTimeout,
    arm_timeout,
    disarm_timeout,
    is_out_of_memory,
    release_memory,
)
from search.optuna_adapter import heartbeat, stored_trial
from search.session import TrialSession
from search.space import suggest
from search.storage_retry import StorageUnavailable
from search.study import OpenStudy, Step, claim_slot, taken_over_at_the_end, wait_to_take_over
from search.workers import BudgetLock, fail_and_retry, retry

OnEpoch = Callable[[int, dict[str, float], Any], bool]


class Pack(Protocol):
    """Trials of one objective trained together (``objectives.objective.CNNPack``)."""

    def resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        """The full training settings for ``params`` (what a trial's MLflow run records)."""

    def add(self, key: int, params: dict[str, Any], on_epoch: OnEpoch, resume: dict[str, Any] | None) -> None:
        """A new member, trained from the next epoch on; ``on_epoch`` is its session's hook."""

    def run_epoch(self) -> list[tuple[int, Exception | None]]:
        """Train every member one epoch; the members that left: (key, what its hook raised, or None)."""

    def take(self, key: int) -> tuple[dict[str, Any], Any]:
        """A member that left without error: (its checkpoint dict without weights, its model)."""

    def remove(self, key: int) -> None:
        """Take a member out before it is done (it ran past trial_timeout); the others go on unchanged."""

    def __len__(self) -> int: ...


@runtime_checkable
class PackingObjective(Protocol):
    """The optional part of the objective plugin protocol (``search/plugins.py``) that packing needs."""

    def pack_key(self, params: dict[str, Any]) -> dict[str, Any] | str:
        """The sampled params members of one pack must share (for the CNN: batch size, architecture), or, for
        a trial with these params that cannot be packed (it then runs alone), why: a phrase for the note."""

    def open_pack(self, params: dict[str, Any]) -> Pack:
        """An empty pack for trials whose pack key is ``pack_key(params)``."""


def can_pack(objective: object) -> bool:
    return isinstance(objective, PackingObjective)


def group_key(fixed: dict[str, Any]) -> str:
    """A hashable form of a pack key."""
    return repr(sorted(fixed.items()))


@dataclass
class Member:
    trial: optuna.Trial
    session: TrialSession
    beat: contextlib.ExitStack
    fixed: dict[str, Any]
    deadline: float | None = None  # when its trial_timeout ends (time.monotonic)


@contextlib.contextmanager
def _released_after() -> Iterator[None]:
    """A Ctrl-C held while a finished trial's end was recorded (search/interrupts.py) is raised once it is told."""
    try:
        yield
    finally:
        interrupts.release()


class PackRunner:
    """One worker's packs. ``ask`` starts trials under the budget lock; ``run`` trains them until the budget,
    the timeout or ``max_failures`` failures in a row stop it."""

    def __init__(self, opened: OpenStudy, n_trials: int | None, timeout: float | None, size: int, lock: BudgetLock,
                 callbacks: list[Callable[[optuna.Study, FrozenTrial], None]], should_stop: Callable[[], bool]) -> None:
        self.opened = opened
        self.study: optuna.Study = opened.study
        assert isinstance(opened.objective, PackingObjective)
        self.objective: PackingObjective = opened.objective
        self.n_trials = n_trials
        self.timeout = timeout
        self.size = size
        self.lock = lock
        self.callbacks = callbacks
        self.should_stop = should_stop
        self.started = time.monotonic()
        self.packs: dict[str, Pack] = {}
        self.members: dict[int, Member] = {}
        self.refill: list[dict[str, Any]] = []  # pack keys of slots freed by members that left
        self.ran = 0
        self.noted_alone = False

    # --- starting trials -----------------------------------------------------------------------------------------

    def _may_start(self) -> bool:
        timed_out = self.timeout is not None and time.monotonic() - self.started >= self.timeout
        return not timed_out and not self.should_stop()

    def ask(self, fixed: dict[str, Any] | None) -> tuple[optuna.Trial, dict[str, Any]] | Step:
        """A new RUNNING trial with its sampled params, or what ``claim_slot`` said instead ("wait", "stop").
        ``fixed``: params to enqueue for it (a refill of a pack's slot), unless a waiting trial (a retry) comes
        first."""
        study, opened = self.study, self.opened
        self.lock.acquire()
        try:
            step = claim_slot(opened, self.n_trials)
            if step != "start":
                return step
            if fixed and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                study.enqueue_trial(fixed)
            with warnings.catch_warnings():  # "heartbeat ... with Study.optimize": the runner keeps it itself
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask()  # RUNNING now: other workers count it
        finally:
            self.lock.release()
        with self._unclaimed_on_error(trial):
            return trial, suggest(trial, opened.settings.space)

    @contextlib.contextmanager
    def _unclaimed_on_error(self, trial: optuna.Trial) -> Iterator[None]:
        """Between ``study.ask`` and the trial's session taking it over (a member of a pack, or the objective
        alone), nobody would end a RUNNING trial that an error, Ctrl-C or SIGTERM leaves behind: it would hold
        a slot of the budget for ever. Fail it (reason ``interrupted``) and enqueue its retry here; a trial
        that its session already ended, or that joined ``members`` (``run`` ends those), is left as it is."""
        try:
            yield
        except BaseException:
            if trial.number not in self.members:
                with contextlib.suppress(Exception):  # the storage may be what failed: the error below says so
                    fail_and_retry(self.study, stored_trial(trial), "interrupted")
            raise

    def fill(self) -> None:
        """Ask trials until this worker holds ``size`` of them (refilling freed slots first) or none may start."""
        while len(self.members) < self.size and self._may_start():
            fixed_hint = self.refill.pop(0) if self.refill else None
            asked = self.ask(fixed_hint)
            if asked == "wait" and not self.members:  # the rest of the budget runs elsewhere: stay to take over
                wait_to_take_over(self.opened)
                continue
            if isinstance(asked, str):
                self.refill.clear()
                return
            trial, params = asked
            with self._unclaimed_on_error(trial):
                fixed = self.objective.pack_key(params)
                if isinstance(fixed, str):
                    self._run_alone(trial, fixed)
                    continue
                self._join(trial, params, fixed)

    def _join(self, trial: optuna.Trial, params: dict[str, Any], fixed: dict[str, Any]) -> None:
        key = group_key(fixed)
        pack = self.packs.get(key)
        if pack is None:
            pack = self.packs[key] = self.objective.open_pack(params)
        ctx = self.opened.ctx
        assert ctx is not None
        beat = contextlib.ExitStack()
        try:
            beat.enter_context(heartbeat(trial))
            session = ctx.trial(trial, params, pack.resolved(params))
        except BaseException:
            beat.close()
            raise  # ``fill`` fails and retries the trial
        member = Member(trial, session, beat, fixed)
        try:
            session.__enter__()
            member.deadline = session.take_deadline()  # the pack's alarm times it (see _epoch)
            together = [n for n, m in self.members.items() if group_key(m.fixed) == key] + [trial.number]
            trial.set_user_attr(records.PACKED_WITH, together)
            pack.add(trial.number, params, session.on_epoch, session.resume_training)
        except BaseException as exc:
            self.members[trial.number] = member
            if not isinstance(exc, Exception):
                raise  # Ctrl-C or SIGTERM: ``run`` ends this trial with the others (interrupted, re-enqueued)
            self._end(trial.number, exc)  # a config the pack refuses fails this trial only
            return
        self.members[trial.number] = member

    def _run_alone(self, trial: optuna.Trial, reason: str) -> None:
        """A trial that cannot be packed, run through the objective as ``study.optimize`` would run it."""
        if not self.noted_alone:
            print(f"note: study.pack = {self.size}: trial {trial.number} cannot be packed ({reason}); such trials "
                  "run one at a time", file=sys.stderr)
            self.noted_alone = True
        with heartbeat(trial), _released_after():
            try:
                value = float(self.opened.objective(trial))
            except TrialTakenOver:
                return  # logged by the session; the trial's retry belongs to whoever took it over
            except optuna.TrialPruned:
                self._tell(trial, state=TrialState.PRUNED)
            except TrialFailed:
                self._tell(trial, state=TrialState.FAIL)
            except BaseException:
                self._tell(trial, state=TrialState.FAIL)
                raise
            else:
                self._tell(trial, value)

    # --- ending trials -------------------------------------------------------------------------------------------

    def _tell(self, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None) -> bool:
        """Record the trial's end in Optuna; False when another worker had failed it as stale first (then its
        MLflow run is ended KILLED, as ``run_trials`` does)."""
        frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
        if frozen.state != (state or TrialState.COMPLETE):
            taken_over_at_the_end(self.opened, trial)
            return False
        self.ran += 1
        for callback in self.callbacks:
            callback(self.study, frozen)
        return True

    def _end(self, number: int, error: BaseException | None, oom_pack: int = 0) -> None:
        """Finish one member's trial: COMPLETE with its value, PRUNED, or FAIL (retried after an OOM, Ctrl-C or
        a pack epoch cut short), unless another worker took it over."""
        member = self.members.pop(number)
        trial, session = member.trial, member.session
        try:
            if isinstance(error, StorageUnavailable):  # not this worker's to record: only its MLflow run ends, KILLED
                session.__exit__(type(error), error, error.__traceback__)
                return
            if error is None:
                pack = self.packs[group_key(member.fixed)]
                try:
                    checkpoint, model = pack.take(number)
                    value = session.complete(checkpoint, model=model)
                except Exception as exc:  # noqa: BLE001 - failing to save fails this trial, as unpacked
                    error = exc
                else:
                    session.__exit__(None, None, None)
                    self._tell(trial, value)
                    return
            if isinstance(error, optuna.TrialPruned):
                session.__exit__(type(error), error, error.__traceback__)
                self._tell(trial, state=TrialState.PRUNED)
                return
            if oom_pack:
                trial.set_user_attr(records.OOM_PACK_SIZE, oom_pack)
            with contextlib.suppress(TrialFailed):  # KeyboardInterrupt, TrialInterrupted are re-enqueued in there
                session.__exit__(type(error), error, error.__traceback__)
            if self._tell(trial, state=TrialState.FAIL) and oom_pack:
                retry(self.study, stored_trial(trial))  # resumes from its last.pt in a smaller pack
        except TrialTakenOver:
            return  # logged by the session, its MLflow run ended KILLED; the retry belongs to whoever took it over
        except KeyboardInterrupt:
            if error is None or isinstance(error, optuna.TrialPruned):  # Ctrl-C while its end was being recorded:
                self.members[number] = member  # ``run`` ends it with the others (interrupted, re-enqueued)
            raise
        finally:
            member.beat.close()
            interrupts.release()  # a Ctrl-C held while a finished member's end was recorded and told stops now

    def _drop_empty(self) -> None:
        for key in [k for k, pack in self.packs.items() if not len(pack)]:
            del self.packs[key]

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train packs until no trial is left to run; returns the trials this worker finished."""
        try:
            self.fill()
            while self.members:
                for key in list(self.packs):
                    self._epoch(key)
                self._drop_empty()
                self.fill()
        except BaseException as exc:  # Ctrl-C, SIGTERM (each open trial failed, re-enqueued), a lost storage, a bug
            for number in list(self.members):
                self._end(number, exc)
            raise
        return self.ran

    def _numbers(self, key: str) -> list[int]:
        return [n for n, m in self.members.items() if group_key(m.fixed) == key]

    def _epoch(self, key: str) -> None:
        pack = self.packs[key]
        now = time.monotonic()
        for number in self._numbers(key):  # past its trial_timeout between two epochs: it leaves alone
            deadline = self.members[number].deadline
            if deadline is not None and now >= deadline:
                pack.remove(number)
                self._end(number, TrialTimeout("the trial ran past study.trial_timeout"))
        if not len(pack):
            return
        deadlines = [d for n in self._numbers(key) if (d := self.members[n].deadline) is not None]
        try:
            armed = bool(deadlines) and arm_timeout(max(min(deadlines) - time.monotonic(), 1e-3), EpochCutShort)
            try:
                left = pack.run_epoch()
            finally:
                if armed:
                    disarm_timeout()
        except EpochCutShort:
            self._cut_short(key)
            return
        except Exception as exc:  # noqa: BLE001 - the pack itself failed (out of memory, a bug): all its members
            numbers = self._numbers(key)
            oom = is_out_of_memory(exc) and len(numbers) > 1
            del self.packs[key]
            for number in numbers:
                self._end(number, exc, oom_pack=len(numbers) if oom else 0)
            if oom:
                release_memory()
                self.size = max(1, len(numbers) // 2)
                print(f"note: a pack of {len(numbers)} trials ran out of memory; its trials are retried in packs of "
                      f"at most {self.size}", file=sys.stderr)
            return
        for number, error in left:
            fixed = self.members[number].fixed
            self._end(number, error)
            if isinstance(error, StorageUnavailable):
                raise error  # the worker stops, as unpacked; ``run`` ends the other members' runs likewise
            self.refill.append(fixed)

    def _cut_short(self, key: str) -> None:
        """The pack's alarm went off inside an epoch: the members past their deadline fail (``trial_timeout``),
        the others are interrupted and re-enqueued (``pack_interrupted``); the half-trained pack is dropped."""
        numbers = self._numbers(key)
        del self.packs[key]
        deadlines = {n: self.members[n].deadline for n in numbers}
        due = max(time.monotonic(), min((d for d in deadlines.values() if d is not None), default=0.0))
        for number in numbers:
            deadline = deadlines[number]
            if deadline is not None and deadline <= due:
                self._end(number, TrialTimeout("the trial ran past study.trial_timeout"))
            else:
                self._end(number, TrialInterrupted("pack_interrupted"))
