"""`hpo dashboard`: optuna-dashboard on a study's storage, with its artifact store, without starving workers.

The dashboard only reads the storage (unless a user edits a note in it). For SQLite its connections get a
busy timeout, so a read that meets a worker's write waits instead of failing, and reads hold no lock
between requests; workers (timeout 60 s, see ``search.study.open_storage``) do the same the other way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from search.errors import HpoError, SettingsError
from search.publish import ARTIFACT_DIR, artifact_store

SQLITE_TIMEOUT_S = 60


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """The dashboard polls every few seconds; one log line per request would bury everything else."""


def dashboard_storage(url: str) -> optuna.storages.BaseStorage:
    """A storage for reading: no table creation or migration check, SQLite reads wait for writers."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise SettingsError(f"no results here yet: {path} does not exist. Run `hpo run FILE` first, or pass "
                                "the --run-dir/--storage it used.")
        return optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True,
                                          engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})
    from search.study import open_storage

    return open_storage(url)


def make_app(storage_url: str, root: Path) -> object:
    """The optuna-dashboard WSGI app with the study's artifact store (``<root>/optuna-artifacts``)."""
    from optuna_dashboard import wsgi

    return wsgi(dashboard_storage(storage_url), artifact_store=artifact_store(root))


def serve(storage_url: str, root: Path, host: str, port: int) -> int:
    """Serve until Ctrl-C; a port in use is a clear error, not a traceback."""
    app = make_app(storage_url, root)
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise HpoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}. Another program may use the port; "
                       "pass --port N (and --host ADDRESS to listen elsewhere than 127.0.0.1).") from exc
    print(f"optuna-dashboard on http://{host}:{port}/ (storage {storage_url}, artifacts {root / ARTIFACT_DIR}); "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
