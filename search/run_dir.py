"""Which study a run directory's study folder holds: the stamp that keeps two studies out of one folder.

``RUN_DIR/NAME/`` holds one study's checkpoints, MLflow store and artifacts, but the study itself lives in its
storage, and ``--storage`` can point anywhere: two studies of one name in two storages, given the same run
directory, overwrote each other's checkpoints and shared one MLflow store. So every study gets an id (a user attr,
``records.STUDY_ID``), set once under the budget lock, which every worker of the study takes, and the first run that
uses a folder stamps it with that id (``study.json``). A command whose study has another id is refused, before it
writes anything. Folders and studies made before the stamp existed are adopted: stamped on their study's next run,
never refused; until then a folder whose own optuna.db holds a study of its name belongs to that study. The id alone
decides; the stamp's study name and storage URL (password redacted) are for the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna

from search import records
from search.errors import StorageError
from search.stores import RunPaths, open_for_reading, redact, run_paths, sqlite_path, sqlite_url

STAMP_FILE = "study.json"


@dataclass(frozen=True)
class Stamp:
    """What ``study.json`` says: the id of the study the folder holds, with its name and storage for people."""

    study_id: str
    study_name: str
    storage: str


def read_stamp(root: Path) -> Stamp | None:
    """The folder's stamp, or None when it has none (a new folder, or one made before stamps)."""
    path = root / STAMP_FILE
    try:
        data = json.loads(path.read_text())
        return Stamp(str(data["study_id"]), str(data["study_name"]), str(data["storage"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StorageError(
            f"{path} is not the stamp hpo writes ({type(exc).__name__}: {exc}); it names the study whose "
            f"checkpoints and MLflow runs the folder {root} holds. If you know the folder holds this study, delete "
            "the file and run again (it is written anew); otherwise pass another --run-dir."
        ) from exc


def write_stamp(root: Path, stamp: Stamp) -> Stamp:
    """Stamp the folder unless it is stamped already, and return the stamp it has now. Atomic: the JSON goes to a
    temporary file that is then hard-linked into place, which fails when another process stamped first, so a
    reader never sees half a stamp and of several processes stamping at once exactly one wins."""
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{STAMP_FILE}.", dir=root)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(stamp), fh, indent=2)
            fh.write("\n")
        with contextlib.suppress(FileExistsError):  # stamped by another process first: that stamp stands
            os.link(tmp, root / STAMP_FILE)
    finally:
        os.unlink(tmp)
    return read_stamp(root) or stamp


def _user_attrs(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    """The user attrs of the study ``name`` in ``storage``, or None when it has no such study."""
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        return None


def stored_id(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    """The id of the study ``name`` in ``storage``; None when there is no such study yet (it will get a new id) or
    it was made before ids (it gets one on its next run)."""
    value = (_user_attrs(storage, name) or {}).get(records.STUDY_ID)
    return str(value) if value else None


def ensure_id(study: optuna.Study) -> str:
    """The study's id, set now if it has none. Call it under the study's budget lock, so that workers opening the
    study together agree on one id."""
    value = study.user_attrs.get(records.STUDY_ID)
    if not value:
        value = uuid.uuid4().hex
        study.set_user_attr(records.STUDY_ID, value)
    return str(value)


def refusal(paths: RunPaths, stamp: Stamp | None, study_id: str | None) -> str | None:
    """Why the study with ``study_id`` (None: a new study, or one without an id) must not use the folder
    ``paths.root`` that carries ``stamp``; None when it may. One paragraph: whose folder it is, which study this
    command uses, what to do."""
    if stamp is None or stamp.study_id == study_id:
        return None
    root, here = paths.root, shown(paths.storage_url)
    if stamp.storage == here:
        return (f"the run directory {root} belongs to study {_owner(stamp)} of the storage {here}, which no longer "
                "has that study (the database, or the study in it, was deleted), so the folder's checkpoints and "
                "MLflow runs belong to a study that is gone. Nothing was changed. To start over, delete the whole "
                f"folder {root} (not only its optuna.db), or pass another --run-dir.")
    own = _own_storage(root) == stamp.storage
    use_its = "leave --storage out" if own else f"pass --storage {stamp.storage}"
    return (f"the run directory {root} belongs to another study: {_owner(stamp)} of the storage {stamp.storage}, "
            f"whose checkpoints and MLflow runs it holds. This command's study {paths.study_name!r} of the storage "
            f"{here} is {'a different one' if study_id else 'not that study'}, and sharing the folder would overwrite "
            "those checkpoints and mix the two studies' MLflow runs, so nothing was changed. Pass another --run-dir "
            f"for this study (the one its runs used), or {use_its} to use the study the folder holds.")


def shown(url: str) -> str:
    """A storage URL as a stamp and a message show it: its password redacted, a SQLite file's path absolute."""
    db = sqlite_path(url)
    return sqlite_url(db.resolve()) if db is not None else redact(url)


def _owner(stamp: Stamp) -> str:
    return f"{stamp.study_name!r} ({f'id {stamp.study_id}' if stamp.study_id else 'made before studies had ids'})"


def _own_storage(root: Path) -> str:
    """The storage URL of the folder's own optuna.db (what a run without --storage uses)."""
    return run_paths(root.parent, root.name).storage_url


def implied_stamp(paths: RunPaths) -> Stamp | None:
    """The owner of a folder made before stamps, when this command uses another storage than the folder's own
    optuna.db and that file holds a study of this name: that study (its id, or "" if it has none yet). A folder
    without a stamp and without such a file is anyone's: the first run stamps it."""
    own = _own_storage(paths.root)
    db, used = sqlite_path(own), sqlite_path(paths.storage_url)
    if db is None or not db.is_file() or (used is not None and used.resolve() == db.resolve()):
        return None
    attrs = _user_attrs(open_for_reading(own), paths.study_name)
    if attrs is None:
        return None
    return Stamp(str(attrs.get(records.STUDY_ID) or ""), paths.study_name, own)


def check_folder(paths: RunPaths, study_id: str | None) -> None:
    """Refuse (StorageError, exit 2) when the folder is stamped for another study than ``study_id``."""
    message = refusal(paths, read_stamp(paths.root) or implied_stamp(paths), study_id)
    if message is not None:
        raise StorageError(message)


def check_before_creating(paths: RunPaths) -> None:
    """Before the storage is opened: a study in a SQLite file that does not exist yet is a new study, so a stamped
    folder refuses it now, and the refused command leaves no empty database behind."""
    db = sqlite_path(paths.storage_url)
    if db is not None and not db.exists():
        check_folder(paths, None)


def claim_folder(paths: RunPaths, study: optuna.Study) -> str | None:
    """Give the study its id and stamp the folder with it, or refuse when another study stamped it first. Under the
    budget lock (see ``ensure_id``). A study in memory is neither given an id nor stamps: nothing can come back to
    it, and a later study may have the folder. Returns the id (None in memory)."""
    if paths.storage_url == "memory":
        check_folder(paths, None)
        return None
    study_id = ensure_id(study)
    stamp = write_stamp(paths.root, Stamp(study_id, paths.study_name, shown(paths.storage_url)))
    message = refusal(paths, stamp, study_id)
    if message is not None:
        raise StorageError(message)
    return study_id
