"""`hpo dashboard`: optuna-dashboard on a study's storage, with its artifact store, without starving workers.

The dashboard only reads the storage (unless a user edits a note in it). For SQLite its connections get a
busy timeout, so a read that meets a worker's write waits instead of failing, and reads hold no lock
between requests; workers (timeout 120 s, see ``search.stores.open_storage``) do the same the other way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, BinaryIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from search.errors import HpoError, cannot_listen
from search.publish import ARTIFACT_DIR, artifact_store
from search.stores import open_for_reading

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """The dashboard polls every few seconds; one log line per request would bury everything else."""


class StudyFolders:
    """The artifact folders of every study of a store, read as one artifact store (`hpo dashboard --storage URL`
    without a study). Artifact ids are unique, so a read finds its file in whichever study folder has it.
    Uploading through the page needs one study's folder: open that study with FILE or --study NAME."""

    def __init__(self, folders: list[Path]) -> None:
        self.stores = [FileSystemArtifactStore(str(f)) for f in folders if f.is_dir()]

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the study folders")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        raise OSError("this dashboard shows a whole store; to upload, open the study with `hpo dashboard FILE`")

    def remove(self, artifact_id: str) -> None:
        for store in self.stores:
            try:
                store.remove(artifact_id)
            except ArtifactNotFound:
                continue


def store_artifacts(storage: optuna.storages.BaseStorage, run_dir: Path) -> StudyFolders:
    """``RUN_DIR/NAME/optuna-artifacts`` of every study in ``storage`` (those that exist on this machine)."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    return StudyFolders([(run_dir / name / ARTIFACT_DIR).resolve() for name in names])


def make_app(storage_url: str, root: Path | None, run_dir: Path | None = None) -> WSGIApplication:
    """The optuna-dashboard WSGI app: one study's artifact store (``<root>/optuna-artifacts``), or with
    ``root`` None the whole store, with every study's artifacts found under ``run_dir``."""
    from optuna_dashboard import wsgi

    storage = open_for_reading(storage_url)
    try:
        artifacts = artifact_store(root) if root is not None else store_artifacts(storage, run_dir or Path("runs"))
    except OSError as exc:  # the artifact folder is made if missing
        raise HpoError(f"cannot create the dashboard's artifact folder under {root or run_dir}: "
                       f"{exc.strerror or exc}. Run the dashboard where the run directory is writable.") from exc
    app: WSGIApplication = wsgi(storage, artifact_store=artifacts)
    return app


def serve(storage_url: str, root: Path | None, host: str, port: int, run_dir: Path | None = None) -> int:
    """Serve until Ctrl-C; a port in use is a clear error, not a traceback."""
    app = make_app(storage_url, root, run_dir)
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise cannot_listen(host, port, exc) from exc
    what = f"artifacts {root / ARTIFACT_DIR}" if root is not None else f"every study, artifacts under {run_dir}"
    print(f"optuna-dashboard on http://{host}:{port}/ (storage {storage_url}, {what}); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
