"""One study per run directory (search/run_dir.py): a second study of the same name in another storage, given the
same --run-dir, is refused before it overwrites the first one's checkpoints or mixes its MLflow runs; the study's
own resumes, its other workers and its reading commands are not, nor are folders made before the stamp existed."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.cli import main
from search.run_dir import STAMP_FILE, Stamp, read_stamp, refusal, shown, write_stamp
from search.stores import run_paths

pytestmark = pytest.mark.usefixtures("quiet_optuna")

QUICKSTART = Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml"
SMALL = ("--set", "study.max_epochs=1", "--quiet")


def hpo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`hpo ARGS` in this process: (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def first_study(capsys: pytest.CaptureFixture[str], runs: Path, trials: int = 1) -> None:
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", runs, "--trials", trials, "--set", "sampler.seed=1",
                    *SMALL)
    assert code == 0, err


def snapshot(root: Path) -> dict[str, object]:
    """What the first study has in its folder and storage: every checkpoint's bytes, its trials, its MLflow runs."""
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    runs = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()])
    return {"checkpoints": {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted((root / "checkpoints").rglob("*.pt"))},
            "trials": [(t.number, t.state, t.params) for t in study.get_trials()],
            "mlflow_runs": sorted(r.info.run_id for r in runs),
            "stamp": read_stamp(root)}


def one_paragraph(err: str) -> str:
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    text = err[err.index("error: "):].strip()
    assert "\n" not in text, text
    return text


def test_a_second_study_of_the_same_name_in_another_storage_is_refused_and_the_first_is_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    runs, root = tmp_path / "rd", tmp_path / "rd" / "quickstart"
    first_study(capsys, runs)
    before = snapshot(root)
    assert before["checkpoints"] and before["stamp"] is not None
    other = f"sqlite:///{tmp_path / 'other.db'}"
    second = ("--run-dir", runs, "--storage", other, "--trials", "1", "--set", "sampler.seed=2", *SMALL)
    for command in ("run", "worker"):
        code, err = hpo(capsys, command, QUICKSTART, *second)
        text = one_paragraph(err)
        assert code == 2, err
        assert f"the run directory {root} belongs to another study: 'quickstart' (id " in text
        assert f"of the storage sqlite:///{root / 'optuna.db'}, whose checkpoints and MLflow runs it holds" in text
        assert f"This command's study 'quickstart' of the storage {other} is not that study" in text
        assert "Pass another --run-dir for this study" in text and "leave --storage out" in text
    assert snapshot(root) == before  # checkpoints, trials, MLflow runs and stamp as they were
    assert not (tmp_path / "other.db").exists()  # and the refused runs created nothing

    # The second study in a run directory of its own; then the first one's folder, read with its storage
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "rd2", *second[2:])
    assert code == 0, err
    for command in (("best", "--json"), ("status",), ("report", "--no-mlflow"), ("export", "--out", tmp_path / "m")):
        code, err = hpo(capsys, command[0], QUICKSTART, "--run-dir", runs, "--storage", other, *command[1:])
        assert code == 2 and "belongs to another study" in one_paragraph(err) and "a different one" in err, err
    assert not (tmp_path / "m").exists() and not (root / "report").exists()
    assert snapshot(root) == before
    code, err = hpo(capsys, "best", QUICKSTART, "--run-dir", runs, "--json")  # its own study: the first one's best
    assert code == 0, err


def test_the_study_itself_its_second_worker_and_its_readers_are_not_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runs, root = tmp_path / "rd", tmp_path / "rd" / "quickstart"
    first_study(capsys, runs)
    stamp = read_stamp(root)
    assert stamp is not None and stamp.storage == f"sqlite:///{root / 'optuna.db'}"
    study = optuna.load_study(study_name="quickstart", storage=stamp.storage)
    assert study.user_attrs["hpo.study_id"] == stamp.study_id

    # a second worker on another machine: the same storage, its own run directory, which it stamps alike
    code, err = hpo(capsys, "worker", QUICKSTART, "--run-dir", tmp_path / "host2", "--storage", stamp.storage,
                    "--trials", "2", *SMALL)
    assert code == 0, err
    assert read_stamp(tmp_path / "host2" / "quickstart") == stamp
    # the same storage named by another URL (a relative path) in the first folder; then a plain resume
    code, err = hpo(capsys, "worker", QUICKSTART, "--run-dir", runs, "--trials", "3", *SMALL, "--storage",
                    "sqlite:///rd/quickstart/optuna.db")
    assert code == 0, err
    first_study(capsys, runs, trials=4)
    assert len(optuna.load_study(study_name="quickstart", storage=stamp.storage).trials) == 4
    for command in (("best", "--json"), ("status",)):
        code, err = hpo(capsys, command[0], QUICKSTART, "--run-dir", runs, *command[1:])
        assert code == 0, err
    assert read_stamp(root) == stamp


def test_a_folder_made_before_stamps_is_adopted_by_its_own_study_and_refused_to_another(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, root = tmp_path / "rd", tmp_path / "rd" / "quickstart"
    with monkeypatch.context() as old:  # what hpo did before run directories were stamped
        old.setattr("search.study.check_folder", lambda *a: None)
        old.setattr("search.study.claim_folder", lambda *a: None)
        first_study(capsys, runs)
    assert not (root / STAMP_FILE).exists()
    before = snapshot(root)
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", runs, "--storage", f"sqlite:///{tmp_path / 'b.db'}",
                    "--trials", "1", *SMALL)
    assert code == 2 and "belongs to another study: 'quickstart' (made before studies had ids)" in one_paragraph(err)
    code, err = hpo(capsys, "status", QUICKSTART, "--run-dir", runs)  # reading: allowed, and writes no stamp
    assert code == 0 and not (root / STAMP_FILE).exists(), err
    assert snapshot(root) == before
    first_study(capsys, runs, trials=2)  # its own next run adopts it
    stamp = read_stamp(root)
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    assert stamp is not None and stamp.study_id == study.user_attrs["hpo.study_id"] and len(study.trials) == 2


def test_a_folder_whose_study_was_deleted_with_its_database_is_not_reused_silently(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    runs, root = tmp_path / "rd", tmp_path / "rd" / "quickstart"
    first_study(capsys, runs)
    for db in root.glob("optuna.db*"):
        db.unlink()
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", runs, "--trials", "1", *SMALL)
    text = one_paragraph(err)
    assert code == 2 and "which no longer has that study" in text and f"delete the whole folder {root}" in text
    assert not list(root.glob("optuna.db*"))  # no new empty database either


def test_workers_stamping_at_once_agree_on_one_stamp(tmp_path: Path) -> None:
    stamps = [Stamp(f"id{i}", "s", "sqlite:///x.db") for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        seen = list(pool.map(lambda s: write_stamp(tmp_path, s), stamps))
    assert len(set(seen)) == 1 and read_stamp(tmp_path) == seen[0] in stamps
    assert [p.name for p in tmp_path.iterdir()] == [STAMP_FILE]  # no temporary file left
    assert json.loads((tmp_path / STAMP_FILE).read_text())["study_id"] == seen[0].study_id


def test_stamps_name_storages_without_passwords_and_sqlite_files_by_absolute_path() -> None:
    assert shown("postgresql://u:pw@db/hpo") == "postgresql://u:***@db/hpo"
    assert shown("sqlite:///rel/optuna.db") == f"sqlite:///{Path('rel/optuna.db').resolve()}"


def test_refusal_only_for_another_study() -> None:
    paths = run_paths("/r", "s", "sqlite:////other.db")
    mine = Stamp("abc", "s", "sqlite:////r/s/optuna.db")
    assert refusal(paths, None, None) is None and refusal(paths, mine, "abc") is None
    text = refusal(run_paths("/r", "s", "memory"), mine, None)
    assert text is not None and "leave --storage out" in text
    text = refusal(paths, Stamp("abc", "s", "postgresql://u:***@db/hpo"), "def")
    assert text is not None and "pass --storage postgresql://u:***@db/hpo" in text and "a different one" in text
