"""The `hpo` command's help and its errors: one paragraph, exit 2 for bad input, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.cli import main

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
    for command in ("run", "status", "best", "dashboard", "ui"):
        assert f"hpo {command} studies/quickstart.toml" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--set SECTION.KEY=VALUE" in text and "resumes the study" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[study\nname = 'x'", "not valid TOML"),
        ("[study]\nname = 'x'\nn_trails = 3\n[objective]\nname='cnn'", "study.n_trails: unknown key; allowed here:"),
        ("[study]\nname = 'x'\n[space.lr]\ntype='float'\nlow=0.1\nhigh=0.01\n[objective]\nname='cnn'",
         "space.lr: low must be < high"),
        ("[study]\nname = 'x'\n[space.lr]\ntype='float'\nlow=0\nhigh=0.1\nlog=true\n[objective]\nname='cnn'",
         "log-scale range needs low > 0"),
        ("[study]\nname = 'x'\n[objective]\nname='cnn'\ndataset='imagenet'", "objective.dataset"),
        ("[study]\nname = 'x'\n[objective]\nname='resnet'", "unknown objective 'resnet'"),
    ],
)
def test_bad_study_files_exit_2_and_create_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    code, out, err = run(capsys, "run", str(path), "--run-dir", str(tmp_path / "runs"))
    assert code == 2
    assert err.startswith("error: ") and expected in err and str(path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


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


def test_conflicting_study_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", runs, "--trials", "1", "--quiet",
                       "--set", "study.max_epochs=2")
    assert code == 0, err
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", runs, "--trials", "2", "--quiet",
                       "--set", "study.max_epochs=2", "--set", "study.direction='minimize'")
    assert code == 2 and "already exists" in err and "--study-name" in err
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", runs, "--trials", "2", "--quiet",
                       "--set", "study.max_epochs=2", "--set", "space.lr.high=0.5")
    assert code == 2 and "search space (parameters lr)" in err
    import optuna

    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'runs/quickstart/optuna.db'}")
    assert len(study.trials) == 1  # nothing added by the refused runs


def test_unreachable_tracking_server_fails_fast_and_creates_no_study(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import optuna

    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"),
                       "--tracking-uri", "http://127.0.0.1:1")
    assert code == 2 and "does not answer" in err and "Traceback" not in err
    db = tmp_path / "runs" / "quickstart" / "optuna.db"
    assert not db.exists() or optuna.get_all_study_summaries(f"sqlite:///{db}") == []


def test_wrong_database_in_a_postgresql_url_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    import os

    base = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("no PostgreSQL server: set HPO_TEST_POSTGRES_URL (`.ci/run` sets it when 127.0.0.1:5432 answers)")
    host = base.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    url = f"postgresql://nosuchuser:wrongpassword@{host}/no_such_db"
    code, _, err = run(capsys, "run", str(QUICKSTART), "--run-dir", str(tmp_path / "runs"), "--storage", url)
    assert code == 2 and "could not open the Optuna storage" in err
    assert "wrongpassword" not in err and "Traceback" not in err
