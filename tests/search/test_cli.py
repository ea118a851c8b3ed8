"""The `hpo` command's help and its errors: one paragraph, exit 2 for bad input, nothing created."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.cli import main
from tests.services import NO_POSTGRES

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_help_teaches_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    from search.config import find_study_file

    for command in ("run", "status", "best", "dashboard", "ui", "report", "export"):
        assert f"hpo {command} quickstart " in text
    assert Path(find_study_file("quickstart")).resolve() == QUICKSTART.resolve()  # what those lines run
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--set SECTION.KEY=VALUE" in text and "resumes the study" in text


def test_export_help_says_what_the_exported_model_takes_and_returns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mlflow.pyfunc.load_model(DIR)" in text and "float32 images (N, C, H, W)" in text
    assert "0..255 for image folders, not 0..1" in text and "predicts class indices" in text


# Bad input, one row each: (study file, command and options, what the one-paragraph error must say). The study
# file is the quickstart (QS), a file with this text or these bytes (named in the error), or a folder (DIR).
# {tmp} is the test's folder, {pg} the test PostgreSQL server's user@host, {ro} a folder nobody may write to.
QS, DIR = "quickstart", "a folder"
BAD_INPUTS = [
    pytest.param("[study\nname = 'x'", "run", "not valid TOML", id="toml-syntax"),
    pytest.param("[study]\nname = 'x'\nn_trails = 3\n[objective]\nname='cnn'", "run",
                 "study.n_trails: unknown key; allowed here:", id="unknown-key"),
    pytest.param("[study]\nname = 'x'\n[space.lr]\ntype='float'\nlow=0.1\nhigh=0.01\n[objective]\nname='cnn'", "run",
                 "space.lr: low must be < high", id="empty-range"),
    pytest.param("[study]\nname = 'x'\n[space.lr]\ntype='float'\nlow=0\nhigh=0.1\nlog=true\n[objective]\nname='cnn'",
                 "run", "log-scale range needs low > 0", id="log-range-from-0"),
    pytest.param("[study]\nname = 'x'\n[objective]\nname='cnn'\ndataset='imagenet'", "run", "objective.dataset",
                 id="unknown-dataset"),
    pytest.param("[study]\nname = 'x'\n[objective]\nname='resnet'", "run", "unknown objective 'resnet'",
                 id="unknown-objective"),
    pytest.param(QUICKSTART.read_text().encode("utf-16"), "run", "saved as UTF-16, but a study file is TOML in UTF-8",
                 id="utf-16-file"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfa", "run", "not text (byte 0x89 at offset 0",
                 id="binary-file"),
    pytest.param(DIR, "run", "is a folder, not a study file", id="file-is-a-folder"),
    pytest.param(QS, "run --trials 0", "--trials 0: must be at least 1", id="trials-0"),
    pytest.param(QS, "run --trials -3", "--trials -3: must be at least 1", id="trials-negative"),
    pytest.param(QS, "worker --trials -1", "--trials -1: must be at least 1", id="worker-trials-negative"),
    pytest.param(QS, "run --timeout -5", "--timeout -5.0: must be a positive number of seconds", id="timeout-negative"),
    pytest.param(QS, "run --workers 0", "--workers 0: must be at least 1", id="workers-0"),
    pytest.param(QS, "run --workers -2", "--workers -2: must be at least 1", id="workers-negative"),
    pytest.param(QS, "run --trials-per-gpu 0", "--trials-per-gpu 0: must be at least 1", id="trials-per-gpu-0"),
    pytest.param(QS, "run --gpus 99", "--gpus 99: ", id="gpu-that-does-not-exist"),
    pytest.param(QS, "dashboard --port 70000", "--port 70000: a TCP port is a number from 1 to 65535",
                 id="dashboard-port-too-high"),
    pytest.param(QS, "ui --port 0", "--port 0: a TCP port is a number from 1 to 65535", id="ui-port-0"),
    pytest.param(QS, "status --watch --interval 0", "--interval 0.0: must be a positive number", id="interval-0"),
    pytest.param(QS, "run --set early_stopping.enabled=1", "early_stopping.enabled takes true or false, not 1",
                 id="set-int-for-bool"),
    pytest.param(QS, "run --set early_stopping.enabled=yes", 'early_stopping.enabled takes true or false, not "yes"',
                 id="set-string-for-bool"),
    pytest.param(QS, "run --set study.timeout=true", "study.timeout takes a number, not true",
                 id="set-bool-for-number"),
    pytest.param(QS, "run --set study.max_epochs=1e3", "study.max_epochs takes a whole number, not 1000.0",
                 id="set-float-for-int"),
    pytest.param(QS, "run --run-dir {ro}/runs", "cannot create folders in {ro}", id="read-only-run-dir"),
    pytest.param(QS, "run --storage postgresql://{pg}/nosuchdb", "the server answers but has no database 'nosuchdb'",
                 id="postgresql-database-that-does-not-exist"),
    pytest.param(QS, "run --storage postgresq://user@127.0.0.1:5432/hpo", "its scheme 'postgresq' is not a database",
                 id="storage-scheme-typo"),
    pytest.param(QS, "run --tracking-uri htp://127.0.0.1:5000", "its scheme 'htp' is not one MLflow knows",
                 id="tracking-scheme-typo"),
    pytest.param(QS, "run --tracking-uri sqlit:///{tmp}/mlflow.db", "its scheme 'sqlit' is not one MLflow knows",
                 id="tracking-sqlite-typo"),
    pytest.param(QS, "run --tracking-uri sqlite:/{tmp}/mlflow.db", "an SQLite URI has three slashes",
                 id="tracking-sqlite-missing-slashes"),
    pytest.param(QS, "run --tracking-uri file://{tmp}/mlruns", "MLflow's filesystem store is in maintenance mode",
                 id="tracking-file-store"),
]


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot create anything in. Permission bits stop other users; root ignores them,
    so as root the folder is also made immutable (chattr +i), and the test skips when that is not possible."""
    import os

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            folder.chmod(0o755)
            pytest.skip("running as root, where permission bits do not stop writes, and `chattr +i` is not "
                        f"available to make a read-only folder: {done.stderr.strip() or 'chattr missing'}")
        immutable = True
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize(("study", "command", "expected"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_paragraph_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, tmp_path: Path, study: str | bytes,
    command: str, expected: str,
) -> None:
    import os

    fill = {"tmp": str(tmp_path)}
    if "{pg}" in command:
        if not os.environ.get("HPO_TEST_POSTGRES_URL"):
            pytest.skip(NO_POSTGRES)
        fill["pg"] = os.environ["HPO_TEST_POSTGRES_URL"].split("://", 1)[1].rsplit("/", 1)[0]
    if "{ro}" in command:
        fill["ro"] = str(request.getfixturevalue("read_only_folder"))
    if study == QS:
        path = QUICKSTART
    elif study == DIR:
        path = tmp_path / "studies"
        path.mkdir()
    else:
        path = tmp_path / "study.toml"
        path.write_bytes(study) if isinstance(study, bytes) else path.write_text(study)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    name, *options = command.format(**fill).split()
    runs = [] if "--run-dir" in options else ["--run-dir", str(tmp_path / "runs")]
    code, out, err = run(capsys, name, str(path), *runs, *options)
    assert code == 2, err
    assert err.startswith("error: ") and expected.format(**fill) in err, err
    assert "Traceback" not in err and "\n\n" not in err.strip(), err  # one paragraph
    if path != QUICKSTART:
        assert str(path) in err  # names the file
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created
    assert out == ""


def test_commands_that_read_a_study_say_what_they_need(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    runs = ["--run-dir", str(tmp_path / "runs")]
    for command, needs in (("dashboard", "--storage URL for every study"), ("ui", "--tracking-uri URI to open every"),
                           ("status", "give a study FILE or --study NAME"), ("best", "give a study FILE or --study"),
                           ("report", "give a study FILE or --study NAME")):
        code, _, err = run(capsys, command, *runs)
        assert code == 2 and err.startswith("error: ") and needs in err, (command, err)
    code, _, err = run(capsys, "export", *runs, "--out", str(tmp_path / "model"))
    assert code == 2 and "give a study FILE or --study NAME (see hpo export --help)" in err
    code, _, err = run(capsys, "export", "--study", "quickstart", *runs, "--out", str(tmp_path / "model"))
    assert code == 2 and "no results for study 'quickstart' yet" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "model").exists()


def test_bad_override_is_validated_like_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "run", str(QUICKSTART), "--set", "space.dropout.high=1.5",
                       "--run-dir", str(tmp_path / "runs"))
    assert code == 2 and "space.dropout" in err and "1.5" in err
    code, _, err = run(capsys, "run", str(QUICKSTART), "--set", "trials=3", "--run-dir", str(tmp_path / "runs"))
    assert code == 2 and "expected section.key=value" in err
    assert not (tmp_path / "runs").exists()


def test_unreachable_storage_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"),
                       "--storage", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert code == 2
    assert "could not open the Optuna storage" in err and "secret" not in err and "Traceback" not in err
    # libpq's two lines read as two sentences, on one line
    assert "Connection refused. Is the server running on that host and accepting TCP/IP connections? Check" in err


@pytest.mark.parametrize(("option", "url", "expected"), [
    ("--storage", "postgresq://me:SECRET@127.0.0.1:5432/hpo", "its scheme 'postgresq' is not a database"),
    ("--storage", "postgres://me:SECRET@127.0.0.1:5432/hpo",
     "reads the scheme 'postgresql://', not 'postgres://'; write --storage postgresql://me:***@127.0.0.1:5432/hpo"),
    ("--tracking-uri", "postgresq://me:SECRET@127.0.0.1:5432/mlflow", "its scheme 'postgresq' is not one MLflow"),
])
def test_a_misspelt_url_is_named_without_its_password(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      option: str, url: str, expected: str) -> None:
    code, out, err = run(capsys, "worker", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"), option, url)
    assert code == 2 and err.startswith("error: ") and expected in err, err
    assert "SECRET" not in err + out and "me:***@127.0.0.1" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_names_the_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "nodata"
    code, _, err = run(capsys, "run", str(REPO / "studies" / "cifar10.toml"), "--run-dir", str(tmp_path / "runs"),
                       "--set", f"objective.data_dir={str(data)!r}", "--set", "objective.download=false")
    assert code == 2
    assert "cifar-10-batches-py" in err and str(data) in err
    assert not (tmp_path / "runs").exists()


def test_status_without_results_says_what_to_do(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "status", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"))
    assert code == 2 and "Run `hpo run FILE` first" in err


def test_results_next_to_the_study_file_are_named_when_hpo_runs_from_another_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir is relative to the study file but runs/ to the current directory: from another folder, `hpo
    status` names where the results are instead of only "no results", and a run says it starts a new study."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "studies").mkdir(parents=True)
    elsewhere.mkdir()
    study = project / "studies" / "quickstart.toml"
    study.write_text(QUICKSTART.read_text())
    monkeypatch.chdir(project)
    code, _, err = run(capsys, "run", "studies/quickstart.toml", "--trials", "1", "--quiet", "--set",
                       "study.max_epochs=1")
    assert code == 0 and "note:" not in err, err
    monkeypatch.chdir(elsewhere)
    code, _, err = run(capsys, "status", str(study))
    assert code == 2 and "no results for study 'quickstart' yet" in err, err
    assert (f"this study's results are in {project / 'runs' / 'quickstart'}: run hpo from {project}, or pass "
            f"--run-dir {project / 'runs'}.") in " ".join(err.split())
    assert list(elsewhere.iterdir()) == []
    code, _, err = run(capsys, "run", str(study), "--trials", "1", "--quiet", "--set", "study.max_epochs=1")
    assert code == 0 and f"note: {elsewhere / 'runs' / 'quickstart'} is a new folder, so this is a new study" in err


def test_a_study_named_without_its_path_is_the_projects_study_file_from_any_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no studies/ here: `quickstart` is the project's studies/quickstart.toml
    code, _, err = run(capsys, "status", "quickstart", "--run-dir", "runs")
    assert code == 2 and "no results for study 'quickstart' yet" in err, err
    code, _, err = run(capsys, "status", "quickstrat", "--run-dir", "runs")
    assert code == 2 and "study file 'quickstrat' does not exist" in err and ", quickstart (" in err, err


def test_the_commands_printed_after_a_run_open_that_study_as_the_user_named_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hpo run quickstart --study-name renamed`: the commands printed at the end say `quickstart` (not the path
    it resolved to) and `--study-name renamed` (without it they opened the study named in the file); the
    printed `hpo status` line, run as printed, shows this run's trial."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "run", "quickstart", "--trials", "1", "--quiet", "--study-name", "renamed",
                         "--set", "study.max_epochs=1")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.split()[1:2] == ["status"])
    hpo, *words = line.split("#")[0].split()
    assert Path(hpo).name == "hpo" and words == ["status", "quickstart", "--study-name", "renamed"], line
    code, shown, err = run(capsys, *line.split("#")[0].split()[1:])
    assert code == 0, err
    rows = [ln.split()[:2] for ln in shown.splitlines() if ln[:1].isdigit() and ln.split()[1].isupper()]
    assert rows == [["0", "COMPLETE"]] and (tmp_path / "runs" / "renamed" / "optuna.db").exists()


def test_a_rerun_of_a_finished_study_says_it_had_nothing_to_do_and_how_to_run_more(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    runs = str(tmp_path / "runs")
    common = ("run", str(QUICKSTART), "--run-dir", runs, "--quiet", "--set", "study.max_epochs=1")
    code, _, err = run(capsys, *common, "--trials", "1")
    assert code == 0 and "so it trained none" not in err, err
    code, out, err = run(capsys, *common, "--trials", "1")
    assert code == 0 and "0 new in this run" in out, err
    assert "budget of 1 finished trial (study.n_trials or --trials) was met before this run" in err, err
    assert "--trials with more than 1 to run more" in err, err
    code, out, err = run(capsys, *common, "--trials", "2")  # what the note says to do
    assert code == 0 and "1 new in this run" in out and "so it trained none" not in err, err


def test_conflicting_study_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    code, out, err = run(capsys, "run", str(QUICKSTART), "--run-dir", runs, "--trials", "1", "--quiet",
                         "--set", "study.max_epochs=1")
    assert code == 0, err
    assert "budget 1 trial x 1 epoch, " in err and "finished 1 trial (1 complete, " in out  # not "1 trials"
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", runs, "--trials", "2", "--quiet",
                       "--set", "study.max_epochs=2", "--set", "study.direction='minimize'")
    assert code == 2 and "already exists" in err and "--study-name" in err
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", runs, "--trials", "2", "--quiet",
                       "--set", "study.max_epochs=2", "--set", "space.lr.high=0.5")
    assert code == 2 and "search space (parameters lr)" in err
    import optuna

    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'runs/quickstart/optuna.db'}")
    assert len(study.trials) == 1  # nothing added by the refused runs


def test_a_copied_study_file_on_other_data_is_refused_not_resumed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The README's advice "copy this file and point data_dir at your folder", keeping the study name: the copy's
    trials would mean something else, so it must not be mixed into the first file's study."""
    import optuna

    from search import records
    from tests.images import make_image_folder

    make_image_folder(tmp_path / "digits", per_class=12, channels=1)
    make_image_folder(tmp_path / "pets", per_class=12, classes=("ant", "bee", "cow"))
    example = (REPO / "studies" / "folder_example.toml").read_text()
    assert 'data_dir = "../data/digits-folder"' in example and "channels = 1 " in example
    first, copy = tmp_path / "folder_example.toml", tmp_path / "my_copy.toml"
    first.write_text(example.replace('"../data/digits-folder"', '"digits"'))
    copy.write_text(example.replace('"../data/digits-folder"', '"pets"').replace("channels = 1 ", "channels = 3 "))
    runs = str(tmp_path / "runs")
    small = ("--run-dir", runs, "--quiet", "--set", "study.max_epochs=1", "--set", "objective.widths=[8,16]")
    code, out, err = run(capsys, "run", str(first), "--trials", "1", *small)
    assert code == 0 and "1 new in this run" in out, err

    code, _, err = run(capsys, "run", str(copy), "--trials", "2", *small)
    assert code == 2 and "Traceback" not in err, err
    there, here = tmp_path.resolve() / "digits", tmp_path.resolve() / "pets"
    assert (f"already exists in this storage with a different objective (channels 1 there, 3 in the file; "
            f"data_dir '{there}' there, '{here}' in the file)") in err, err
    paragraph = err.split("error: ", 1)[1]
    assert "--study-name NEW" in paragraph and "set them back to the values 'there'" in paragraph, err
    assert paragraph.count("\n") == 1, err  # one paragraph
    storage = f"sqlite:///{tmp_path / 'runs/folder_example/optuna.db'}"
    study = optuna.load_study(study_name="folder_example", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # the refused run added nothing

    # How it runs, and a tuned key's default (dropout is in [space]), do not change what a trial means.
    code, out, err = run(capsys, "run", str(first), "--trials", "2", *small, "--set", "objective.device='cpu'",
                         "--set", "objective.eval_batch_size=7", "--set", "objective.dropout=0.25")
    assert code == 0 and "1 new in this run" in out, err

    # A study made before the fingerprint covered the objective and the data has neither stored: it still resumes,
    # and from then on it holds them, so the next run on other data is refused.
    study.set_user_attr(records.FINGERPRINT, {k: v for k, v in study.user_attrs[records.FINGERPRINT].items()
                                              if k not in ("objective", "objective_name", "data")})
    code, out, err = run(capsys, "run", str(copy), "--trials", "3", *small)
    assert code == 0 and "1 new in this run" in out, err
    assert [t.state.name for t in optuna.load_study(study_name="folder_example", storage=storage).trials] == \
        ["COMPLETE"] * 3
    stored = optuna.load_study(study_name="folder_example", storage=storage).user_attrs[records.FINGERPRINT]
    assert stored["objective"]["data_dir"] == str(here) and stored["data"]["classes"] == 3
    code, _, err = run(capsys, "run", str(first), "--trials", "4", *small)
    assert code == 2 and "different objective" in err and "data (" in err, err


def test_a_study_resumed_on_a_folder_that_gained_images_is_refused_and_resumes_once_it_is_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Same study file, same data_dir, other images in it: the old trials were scored on other validation images."""
    import optuna

    from objectives.data import clear_data_cache
    from tests.images import class_image, make_image_folder, write_image

    make_image_folder(tmp_path / "pets", per_class=12, classes=("ant", "bee", "cow"))
    study_file = tmp_path / "pets.toml"
    study_file.write_text((REPO / "studies" / "folder_example.toml").read_text()
                          .replace('"../data/digits-folder"', '"pets"').replace("channels = 1 ", "channels = 3 "))
    small = ("--run-dir", str(tmp_path / "runs"), "--quiet", "--set", "study.max_epochs=1",
             "--set", "objective.widths=[8,16]")
    code, out, err = run(capsys, "run", str(study_file), "--trials", "1", *small)
    assert code == 0, err
    added = [write_image(tmp_path / "pets" / "bee" / f"new-{i}.png", class_image(1, 100 + i, (24, 20), 3))
             for i in range(6)]
    clear_data_cache()  # as a new `hpo` process starts: this one keeps what it loaded

    code, _, err = run(capsys, "run", str(study_file), "--trials", "2", *small)
    assert code == 2 and "Traceback" not in err, err
    assert ("already exists in this storage with a different data (its images changed: 26/3/7 train/val/test images "
            "of 3 classes there, 31/3/8 of 3 now; the old trials were scored on other validation images)") in err
    assert "--study-name NEW" in err and err.split("error: ", 1)[1].count("\n") == 1, err
    storage = f"sqlite:///{tmp_path / 'runs/folder_example/optuna.db'}"
    assert [t.state.name for t in optuna.load_study(study_name="folder_example", storage=storage).trials] == \
        ["COMPLETE"]  # nothing trained on the changed folder

    for path in added:
        path.unlink()
    clear_data_cache()
    code, out, err = run(capsys, "run", str(study_file), "--trials", "2", *small)
    assert code == 0 and "1 new in this run" in out, err


def test_unreachable_tracking_server_fails_fast_and_creates_no_study(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import optuna

    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"),
                       "--tracking-uri", "http://127.0.0.1:1")
    assert code == 2 and "does not answer" in err and "Traceback" not in err
    db = tmp_path / "runs" / "quickstart" / "optuna.db"
    assert not db.exists() or optuna.get_all_study_summaries(f"sqlite:///{db}") == []


def test_a_tracking_uri_that_answers_but_is_not_mlflow_is_refused_before_the_study_is_made(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Another service's port (here Python's own file server) answers /health-style probes; MLflow's client would
    only fail at its first call, after the run made optuna.db. Its API is asked instead."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            """Not on the test's stderr."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"), "--tracking-uri", uri)
    finally:
        server.shutdown()
    assert code == 2 and "Traceback" not in err, err
    assert f"{uri} answers but is not an MLflow tracking server" in err and "HTTP 404" in err
    assert not (tmp_path / "runs" / "quickstart" / "optuna.db").exists()


def test_wrong_database_in_a_postgresql_url_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    import os

    base = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not base:
        pytest.skip(NO_POSTGRES)
    host = base.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    url = f"postgresql://nosuchuser:wrongpassword@{host}/no_such_db"
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"), "--storage", url)
    assert code == 2 and "could not open the Optuna storage" in err
    assert "wrongpassword" not in err and "Traceback" not in err


def test_workers_that_exit_are_not_reported_as_failed_trials(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    from search.study import RunResult

    def workers_exit(settings, paths, args, plan, n_trials, progress):  # noqa: ANN001, ANN202
        return RunResult(optuna.create_study(), paths, "", 0, None, {}, workers_failed={1: 1, 0: -9})

    monkeypatch.setattr("search.launch.run_parallel", workers_exit)
    code, _, err = run(capsys, "run", str(QUICKSTART), "--workers", "2", "--run-dir", str(tmp_path / "runs"))
    assert code == 1
    assert ("worker process 0 of 2 was killed by SIGKILL (kill -9, or the kernel's out-of-memory killer, which `dmesg` "
            "shows); worker process 1 of 2 exited with code 1 (a worker's own messages are above)") in err
    assert "failed trials in a row" not in err


def test_exit_now_keeps_what_a_normal_exit_does(tmp_path: Path) -> None:
    """`hpo` skips the interpreter's teardown (seconds with torch loaded), but not atexit handlers, threads that are
    not daemons, buffered output or the exit code."""
    script = (
        "import atexit, sys, threading, time\n"
        "from search.cli import exit_now\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished'))).start()\n"
        "print('buffered', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "bufferedthread finished\natexit ran\n"  # the order of a normal exit: threads, then atexit
    assert done.stderr == "to stderr"


def test_a_profiled_hpo_still_writes_its_profile(tmp_path: Path) -> None:
    """Under `python -m cProfile` the exit is a normal one: cProfile writes its stats after the command returns."""
    out = tmp_path / "hpo.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "search.cli", "status",
                           str(QUICKSTART), "--run-dir", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "no results for study 'quickstart' yet" in done.stderr  # (cProfile itself swallows the exit code)
    assert out.stat().st_size > 0


def test_a_recorded_reason_reads_as_part_of_the_stop_message() -> None:
    from search.cli import _reason

    assert _reason("error: ModelError: make forward() return only the logits while training too.") == \
        "ModelError: make forward() return only the logits while training too"
    assert _reason("out_of_memory") == "out_of_memory"


def test_the_printed_commands_run_in_the_users_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` starts .venv/bin/hpo without activating the venv: a bare `hpo` would be 'command not found'."""
    from search.cli import hpo_command

    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "hpo").write_text("#!/bin/sh\n")
    (venv / "hpo").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/hpo", "run"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert hpo_command() == ".venv/bin/hpo"
    monkeypatch.setattr(sys, "argv", [str(venv / "hpo"), "run"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # started by its path from another folder: that path
    assert hpo_command() == str(venv / "hpo")
    monkeypatch.setenv("PATH", f"{venv}:/usr/bin:/bin")  # an activated venv: the name alone
    assert hpo_command() == "hpo"
    monkeypatch.setattr(sys, "argv", ["/somewhere/search/cli.py"])  # python -m search.cli: the venv's script
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    assert hpo_command() == "hpo"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert hpo_command() == str(venv / "hpo")


def test_an_accelerator_torch_does_not_see_is_one_paragraph_and_creates_nothing(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Checked when the data and model are prepared, before any store exists (not at load: `hpo status` of a GPU
    study works on a laptop). No Apple GPU on Linux, so 'mps' is missing wherever the tests run."""
    code, out, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"),
                         "--set", "objective.device='mps'")
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: device = 'mps' was requested but torch sees no Apple GPU") and "Traceback" not in err
    assert "set objective.device to 'auto' or 'cpu'" in last and list(tmp_path.iterdir()) == []


def test_hpo_ui_on_a_port_in_use_says_so_instead_of_starting_mlflow(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`mlflow ui` itself logs the bind error and exits 0, after hpo printed where to open it."""
    import socket

    db = tmp_path / "mlflow.db"
    db.touch()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "ui", "--tracking-uri", f"sqlite:///{db}", "--port", str(port))
    assert code == 1 and f"error: cannot listen on 127.0.0.1:{port}" in err and "pass --port N" in err, err
    assert "MLflow UI on" not in err and "$ " not in err  # nothing promised, nothing started


@pytest.mark.parametrize(("command", "out", "expected"), [
    ("export", "afile/sub", "afile is a file, not a folder. Pass a folder."),
    ("export", "afile", "--out {tmp}/afile is a file; pass a folder"),
    ("report", "afile", "--out {tmp}/afile is a file; pass a folder"),
])
def test_an_out_folder_that_cannot_be_is_one_paragraph(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, out: str, expected: str) -> None:
    """Checked before the study is opened: these were FileExistsError tracebacks (exit 1)."""
    (tmp_path / "afile").write_text("mine")
    code, _, err = run(capsys, command, str(QUICKSTART), "--run-dir", str(tmp_path / "runs"),
                       "--out", str(tmp_path / out))
    assert code == 2 and expected.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "runs").exists()


def test_a_run_directory_on_a_read_only_disk_is_named_as_such(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """SQLite in WAL mode writes side files even to read: the message said "is the database server running?"."""
    import os

    import optuna

    folder = tmp_path / "runs" / "q"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="q", storage=f"sqlite:///{folder / 'optuna.db'}").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("needs root and chattr to make a folder read-only for root")
    try:
        for command in ("status", "dashboard"):
            code, _, err = run(capsys, command, "--study", "q", "--run-dir", str(tmp_path / "runs"))
            assert code in (1, 2) and err.startswith("error: ") and "Traceback" not in err, err
            assert "writable" in err and "database server" not in err, err
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_wrong_study_name_or_storage_names_what_there_is(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    import optuna

    from search.run_dir import Stamp, write_stamp

    shared = f"sqlite:///{tmp_path / 'shared.db'}"  # stands for the workers' PostgreSQL storage
    for name in ("team-study", "other"):
        optuna.create_study(study_name=name, storage=shared)
    runs = tmp_path / "runs"
    write_stamp(runs / "team-study", Stamp("some-id", "team-study", shared))  # a worker's folder on this machine
    code, out, err = run(capsys, "best", "--study", "team-studdy", "--storage", shared, "--run-dir", str(runs))
    assert code == 2 and "has no study named 'team-studdy'. Did you mean 'team-study'?" in err, err
    assert "It holds 'other', 'team-study'" in err
    code, out, err = run(capsys, "status", "--study", "team-study", "--run-dir", str(runs))  # --storage left out
    assert code == 2 and f"holds study 'team-study' of the storage {shared}: pass --storage {shared}" in err, err
    empty = f"sqlite:///{tmp_path / 'shared.db'}".replace("shared.db", "empty.db")
    optuna.create_study(study_name="x", storage=empty)
    code, out, err = run(capsys, "best", "--study", "team-study", "--storage", empty, "--run-dir", str(runs))
    assert code == 2 and f"pass --storage {shared}" in err, err  # the wrong storage: the folder's is named
    assert "Traceback" not in err and "\n\n" not in err.strip() and out == ""
    assert sorted(p.name for p in runs.rglob("*")) == ["study.json", "team-study"]  # nothing created


@pytest.mark.parametrize(("host", "on_disk", "note"), [
    ("gpu-box-7", False, " (on gpu-box-7, not this machine; `hpo export` fetches it from MLflow)"),
    (None, False, " (not found on this machine; `hpo export` fetches it from MLflow)"),
    (None, True, ""),
], ids=["other-machine", "file-gone", "here"])
def test_best_says_when_the_checkpoint_is_not_on_this_machine(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, host: str | None, on_disk: bool, note: str) -> None:
    """With workers on several machines, the best trial's checkpoint path names the disk of the one that ran it."""
    import optuna

    from search.workers import HOST

    checkpoint = tmp_path / "checkpoints" / "trial-0" / "best.pt"
    if on_disk:
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"weights")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="team-study", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, value=0.9,
        user_attrs={"host": host or HOST, "checkpoint": str(checkpoint), "mlflow_run_id": "0123abcd"}))
    code, out, err = run(capsys, "best", "--study", "team-study", "--storage", storage, "--run-dir",
                         str(tmp_path / "runs"))
    assert code == 0, err
    assert f"    checkpoint: {checkpoint}{note}\n" in out, out
    code, out, err = run(capsys, "best", "--study", "team-study", "--storage", storage, "--run-dir",
                         str(tmp_path / "runs"), "--json")
    best = json.loads(out)
    assert code == 0 and best["checkpoint"] == str(checkpoint) and best["host"] == (host or HOST)
    assert best["checkpoint_here"] is on_disk and best["checkpoint_note"] == (note[2:-1] or None)


def test_the_run_summary_hides_the_storage_password(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The summary's "Optuna:" line names the storage without its password (a job's log is read by others)."""
    from tests.search.workers_helpers import postgres_database

    with postgres_database() as url:
        secret = url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@", 1)  # trust auth: any
        assert "s3cret-pw" in secret
        code, out, err = run(capsys, "run", str(QUICKSTART), "--trials", "1", "--set", "study.max_epochs=1",
                             "--storage", secret, "--run-dir", str(tmp_path / "runs"), "--quiet")
        assert code == 0, err
        (line,) = [line for line in out.splitlines() if line.strip().startswith("Optuna:")]
        assert "s3cret-pw" not in line and "***" in line, line


def test_a_worker_that_finds_the_budget_met_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ("worker", str(QUICKSTART), "--trials", "1", "--set", "study.max_epochs=1", "--run-dir",
            str(tmp_path / "runs"), "--quiet")
    code, _, err = run(capsys, *args)
    assert code == 0 and "worker done: ran 1 trial of study 'quickstart'\n" in err, err
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert ("worker done: ran 0 trials of study 'quickstart'; the study's budget of 1 finished trial (study.n_trials "
            "or --trials) was met before this run, so it trained none; give --trials with more than 1") in err


@pytest.mark.parametrize(("command", "resume"), [("report", False), ("run", True)])
def test_an_interrupted_command_speaks_of_resuming_only_where_trials_run(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, resume: bool) -> None:
    from search import cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    code, _, err = run(capsys, command, str(QUICKSTART))
    assert code == 130 and err.strip().startswith("interrupted")
    assert ("run the same command again to resume the study" in err) == resume, err
