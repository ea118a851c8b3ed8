"""Checks of command-line options that must fail before anything is created.

Each check raises ``SettingsError`` (exit 2) with one paragraph naming the option, what is wrong and what
to write instead. They run before the first store, folder or process exists, so a refused command leaves
nothing behind. Study-file content is checked in ``search.config``; this module covers the options.
"""

from __future__ import annotations

import argparse
import errno
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from search.errors import SettingsError, StorageError
from search.stores import redact, sqlite_path

# (option attribute, flag, smallest allowed value, what the option means): whole-number options.
AT_LEAST = [
    ("trials", "--trials", 1, "the number of finished trials the study should have; to look at a study "
                              "without running trials use `hpo status`"),
    ("workers", "--workers", 1, "worker processes"),
    ("trials_per_gpu", "--trials-per-gpu", 1, "concurrent trials per GPU"),
    ("threads", "--threads", 1, "CPU threads for torch"),
    ("seeds", "--seeds", 1, "repeats of each strategy"),
]
TRACKING_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks"}
STORAGE_SCHEMES = {"sqlite", "postgresql", "postgres", "mysql", "mssql", "oracle"}


def check_options(args: argparse.Namespace) -> None:
    """Numbers that cannot mean anything: zero or negative counts, negative times, impossible ports."""
    for attr, flag, low, meaning in AT_LEAST:
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise SettingsError(f"{flag} {value}: must be at least {low} ({meaning}).")
    for attr, flag in (("timeout", "--timeout"), ("interval", "--interval")):
        value = getattr(args, attr, None)
        if value is not None and not value > 0:
            raise SettingsError(f"{flag} {value}: must be a positive number of seconds (leave it out for no limit)."
                                if attr == "timeout" else f"{flag} {value}: must be a positive number of seconds.")
    older = getattr(args, "older_than", None)
    if older is not None and older < 0:
        raise SettingsError(f"--older-than {older}: must be zero or a positive number of seconds.")
    port = getattr(args, "port", None)
    if port is not None and not 1 <= port <= 65535:
        raise SettingsError(f"--port {port}: a TCP port is a number from 1 to 65535 (ports below 1024 need root); "
                            "for example --port 8080.")


def check_gpus(gpus: str, visible: list[str]) -> list[str]:
    """``--gpus 0,1`` -> ["0", "1"], each a device torch can see on this machine."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        raise SettingsError(f"--gpus {gpus!r} names no GPU; write ids like --gpus 0,1, or leave it out to use all.")
    if not visible:
        raise SettingsError(f"--gpus {gpus}: this machine has no CUDA GPU that torch can use, so trials would not "
                            "run where you asked. Leave --gpus out to run on the CPU, or check the driver and "
                            "CUDA_VISIBLE_DEVICES (python -c 'import torch; print(torch.cuda.device_count())').")
    missing = [g for g in ids if g not in visible]
    if missing:
        raise SettingsError(f"--gpus {gpus}: no GPU {', '.join(missing)} on this machine; torch sees "
                            f"{len(visible)} ({', '.join(visible)}). Pick ids from those, or leave --gpus out.")
    return ids


def check_run_dir(run_dir: str | Path) -> None:
    """Results go under ``run_dir``: its nearest existing folder must take new files (tested, not guessed:
    as root, permission bits say yes to everything, while a read-only mount or immutable folder says no)."""
    _check_folder_target(run_dir, "--run-dir", "Pass a folder for the results (default: runs).",
                         "Results, checkpoints and artifacts go there; pass a folder you can write to, for example "
                         "--run-dir ~/hpo-runs.")


def check_out_dir(out: str | Path) -> None:
    """`hpo report --out` and `hpo export --out`: a folder (new, or existing) that can be written, checked as
    ``check_run_dir`` checks the run directory, so a file in the way is one paragraph, not a traceback."""
    if Path(out).is_file():
        raise SettingsError(f"--out {out} is a file; pass a folder (a new one, or an empty one for an export).")
    _check_folder_target(out, "--out", "Pass a folder.", "Pass a folder you can write to.")


def _check_folder_target(target: str | Path, option: str, not_a_folder: str, cannot_write: str) -> None:
    path = Path(target).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"{option} {target}: {existing} is a file, not a folder. {not_a_folder}")
    try:
        Path(tempfile.mkdtemp(prefix=".hpo-write-test-", dir=existing)).rmdir()
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (a read-only file system)" if exc.errno == errno.EROFS else ""
        raise SettingsError(f"{option} {target}: cannot create folders in {existing}: {why}{hint}. "
                            f"{cannot_write}") from exc


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can open: a known scheme (a typo such as ``htp://`` or ``sqlit:///`` is caught here,
    before MLflow's traceback) and, for a file, ``sqlite:///PATH``."""
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.split("+", 1)[0]
    if base not in TRACKING_SCHEMES:
        what = f"its scheme {scheme!r} is not one MLflow knows" if scheme else "it has no scheme"
        raise SettingsError(f"--tracking-uri {redact(uri)}: {what}. Write sqlite:///PATH/mlflow.db for a file, "
                            "http://HOST:PORT for an MLflow server, or postgresql://USER@HOST/DB for a database; "
                            "or leave --tracking-uri out to use the run directory's mlflow.db.")
    if base == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise SettingsError(f"--tracking-uri {uri}: MLflow's filesystem store is in maintenance mode and MLflow 3 "
                            "refuses it (unless MLFLOW_ALLOW_FILE_STORE=true); use sqlite:///PATH/mlflow.db for a "
                            "file, or leave --tracking-uri out to use the run directory's mlflow.db.")
    if base == "sqlite" and sqlite_path(uri) is None:
        raise SettingsError(f"--tracking-uri {uri}: an SQLite URI has three slashes and a path, "
                            "sqlite:///PATH/mlflow.db (four for an absolute path: sqlite:////abs/mlflow.db).")
    if base in ("http", "https"):
        if not urlsplit(uri).netloc:
            raise SettingsError(f"--tracking-uri {uri}: no host; write {scheme}://HOST:PORT, e.g. "
                                "http://127.0.0.1:5000.")
        from search.tracking import probe_server

        probe_server(uri)  # seconds, not MLflow's minutes of retries, when nothing answers


def check_storage_url(url: str) -> None:
    """A storage URL Optuna can open: ``memory``, ``journal:PATH`` or a SQLAlchemy URL with a known database
    scheme. A database server is asked once, so a missing database or a wrong password is named here."""
    if url == "memory" or url.startswith("journal:"):
        return
    if url.startswith("grpc://"):
        from search.proxy import open_proxy

        open_proxy(url).close()  # a one-paragraph error when no hpo storage proxy answers there
        return
    scheme = urlsplit(url).scheme.lower()
    base = scheme.split("+", 1)[0]
    if base == "postgres":  # Heroku's and libpq's spelling, which SQLAlchemy refuses
        fixed = "postgresql" + url[len("postgres"):]
        raise SettingsError(f"--storage {redact(url)}: SQLAlchemy, which opens the storage, reads the scheme "
                            f"'postgresql://', not 'postgres://'; write --storage {redact(fixed)}.")
    if base not in STORAGE_SCHEMES:
        what = f"its scheme {scheme!r} is not a database Optuna can use" if scheme else "it has no scheme"
        raise SettingsError(f"--storage {redact(url)}: {what}. Write sqlite:///PATH/optuna.db, "
                            "postgresql://USER:PASSWORD@HOST:5432/DB, mysql+pymysql://..., journal:PATH or "
                            "grpc://HOST:PORT (an `hpo storage-proxy`); or leave --storage out to use the run "
                            "directory's optuna.db.")
    if base == "sqlite":
        if sqlite_path(url) is None:
            raise SettingsError(f"--storage {url}: an SQLite URL has three slashes and a path, "
                                "sqlite:///PATH/optuna.db (four for an absolute path).")
        return
    _connect_once(url)


def _connect_once(url: str) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    except ModuleNotFoundError:
        return  # open_storage names the missing driver
    except Exception as exc:  # noqa: BLE001 - a malformed URL
        raise StorageError(f"--storage {redact(url)}: not a database URL SQLAlchemy can read ({exc}).") from exc
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - every driver raises its own errors
        text = str(getattr(exc, "orig", exc) or exc)
        database = engine.url.database
        if database and f'database "{database}" does not exist' in text:
            raise StorageError(
                f"--storage {redact(url)}: the server answers but has no database {database!r}. Create it "
                f"(createdb -h {engine.url.host or 'HOST'} -U {engine.url.username or 'USER'} {database}, or "
                f"CREATE DATABASE {database}), or fix the name in the URL. Nothing was created."
            ) from exc
        # libpq's lines as sentences ("Connection refused" / "Is the server running ...?"), on one line
        lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
        said = " ".join(line if line[-1] in ".?!" else line + "." for line in lines)[:300]
        raise StorageError(
            f"could not open the Optuna storage {redact(url)!r}: {said} Check that the database server is "
            "running and reachable, and that the user, password and database name in the URL are right; or "
            "leave --storage out to use the SQLite file in the run directory."
        ) from exc
    finally:
        engine.dispose()
