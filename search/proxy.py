"""`hpo storage-proxy`: Optuna's gRPC storage proxy, plus the study lock that workers behind it share.

Many workers on one PostgreSQL database each hold their own connections (a pool, the heartbeat thread's,
the budget lock's), and PostgreSQL's default limit is 100. Behind the proxy, workers hold none: they speak
gRPC to one process (``grpc://HOST:PORT`` storage URLs) whose small pool is the only one the database sees.

Optuna's proxy serves the storage API only. hpo's budget lock (search/workers.py) must still be shared by
every worker, so the same server also serves ``/hpo.Locks/Hold``: a call that returns one message once the
named lock is held and keeps it until the caller cancels the call or its connection goes away (a worker
killed with ``kill -9`` releases it too). Over a PostgreSQL storage the proxy takes the same advisory lock as
workers connected to the database directly, so both kinds can work on one study.

What the proxy does not carry: Optuna's heartbeats (``GrpcStorageProxy`` is no ``BaseHeartbeat``; checked
against Optuna 5.0), so a trial whose worker died on another machine is not failed by itself: run
``hpo recover --older-than S`` (see README "Several machines").
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from search.errors import SettingsError, StorageError

GRPC = "grpc://"
LOCK_METHOD = "/hpo.Locks/Hold"
PING_METHOD = "/hpo.Locks/Ping"
READY_TIMEOUT_S = 10.0
# Every worker waiting for the lock occupies one server thread while it waits, so the pool must be larger
# than the number of workers; an idle thread costs little.
DEFAULT_THREADS = 512
WORKER_NOTE = ("storage {url} is an hpo storage proxy: no heartbeats through it, so a trial whose worker died on "
               "another machine stays RUNNING until `hpo recover --older-than S` fails and re-enqueues it "
               "(a dead worker on this machine is still recovered at once)")


def is_grpc(url: str) -> bool:
    return url.startswith(GRPC)


def address(url: str) -> tuple[str, int]:
    """``grpc://HOST:PORT`` -> (HOST, PORT); anything else is a one-paragraph SettingsError."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.username:
        raise SettingsError(f"--storage {url}: a storage proxy URL is grpc://HOST:PORT with nothing after the port, "
                            "e.g. grpc://127.0.0.1:13000; start the proxy with `hpo storage-proxy --storage "
                            "postgresql://... --host 0.0.0.0 --port 13000` on a machine that reaches the database.")
    return parts.hostname, port


def _grpc() -> Any:
    try:
        import grpc
    except ModuleNotFoundError as exc:
        raise StorageError("grpc:// storages and `hpo storage-proxy` need the grpcio package, which is not "
                           "installed: run `pip install 'hpo-service[grpc]'` (or `pip install grpcio`).") from exc
    return grpc


def open_proxy(url: str, timeout: float = READY_TIMEOUT_S) -> Any:
    """A ``GrpcStorageProxy`` for ``grpc://HOST:PORT`` that has answered, and is an hpo proxy (it has the lock)."""
    host, port = address(url)
    grpc = _grpc()
    from optuna.storages import GrpcStorageProxy

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary(PING_METHOD)(b"", timeout=timeout)
        except grpc.RpcError as exc:
            raise _unreachable(url, exc) from exc
    return GrpcStorageProxy(host=host, port=port)


def _unreachable(url: str, exc: Any) -> StorageError:
    grpc = _grpc()
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return StorageError(f"--storage {url}: the server there is an Optuna storage proxy but not one started by "
                            "`hpo storage-proxy`, so it has no budget lock and parallel workers could run more trials "
                            "than the budget. Start it with `hpo storage-proxy --storage DATABASE_URL --host HOST "
                            "--port PORT` instead.")
    return StorageError(f"--storage {url}: no storage proxy answered there ({code.name if code else exc}). Start one "
                        "with `hpo storage-proxy --storage DATABASE_URL --host 0.0.0.0 --port PORT` on a machine that "
                        "reaches the database, check the host and port in the URL and that no firewall is in the way; "
                        "or give the database URL itself as --storage.")


class ProxyLock:
    """A named lock held in the proxy for as long as the call that took it is open (see the module docstring)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.host, self.port = address(url)
        self.channel: Any = None
        self.call: Any = None

    def __enter__(self) -> ProxyLock:
        grpc = _grpc()
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"{self.host}:{self.port}")
        self.call = self.channel.unary_stream(LOCK_METHOD)(self.name.encode(), wait_for_ready=True)
        try:
            next(self.call)
        except grpc.RpcError as exc:
            self.call = None
            raise _unreachable(self.url, exc) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


class _Locks:
    """The server side: one threading lock per name, plus the database's advisory lock of the same name."""

    def __init__(self, storage_url: str) -> None:
        self.storage_url = storage_url
        self.guard = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}

    def _lock(self, name: str) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(name, threading.Lock())

    def hold(self, request: bytes, context: Any) -> Iterator[bytes]:
        from search.stores import is_postgres
        from search.workers import advisory_lock

        name = request.decode()
        lock = self._lock(name)
        while not lock.acquire(timeout=0.5):
            if not context.is_active():  # the worker went away while it waited
                return
        try:
            done = threading.Event()
            if not context.add_callback(done.set):  # already cancelled
                return
            if is_postgres(self.storage_url):
                with advisory_lock(self.storage_url, name, per_machine=False):  # the thread lock queues
                    yield b"held"
                    done.wait()
            else:
                yield b"held"
                done.wait()
        finally:
            lock.release()


def _check_port(host: str, port: int) -> None:
    """A port already taken is refused here in one paragraph, before gRPC logs its own lines about it."""
    import socket

    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise SettingsError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick another "
                            "port, or --port 0 for a free one.") from exc


def build_server(storage_url: str, host: str, port: int, threads: int = DEFAULT_THREADS) -> tuple[Any, int]:
    """The proxy's gRPC server, started, and the port it listens on (``port`` 0: a free one)."""
    grpc = _grpc()
    import optuna

    from search.optuna_adapter import grpc_proxy_server
    from search.stores import PROXY_POOL, open_storage

    if is_grpc(storage_url):
        raise SettingsError(f"--storage {storage_url}: the proxy needs the database itself (postgresql://..., "
                            "mysql+pymysql://... or sqlite:///...), not another proxy.")
    _check_port(host, port)
    # get_storage adds Optuna's in-process cache of finished trials, as Optuna advises for its proxy
    storage = optuna.storages.get_storage(open_storage(storage_url, pool=PROXY_POOL))
    locks = _Locks(storage_url)
    server = grpc_proxy_server(storage, ThreadPoolExecutor(max_workers=threads))
    handlers = {
        "Hold": grpc.unary_stream_rpc_method_handler(locks.hold),
        "Ping": grpc.unary_unary_rpc_method_handler(lambda request, context: b"hpo"),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hpo.Locks", handlers),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise SettingsError(f"--host {host} --port {port}: cannot listen there (in use, or not an address of this "
                            "machine); pick another port, or --port 0 for a free one.")
    server.start()
    return server, bound


def serve(storage_url: str, host: str, port: int, threads: int = DEFAULT_THREADS) -> int:
    """Serve ``storage_url`` on HOST:PORT until interrupted; prints the address it listens on."""
    from search.stores import redact

    server, bound = build_server(storage_url, host, port, threads)
    print(f"storage proxy for {redact(storage_url)} listening on grpc://{host}:{bound} ({threads} threads); workers "
          f"use --storage grpc://{host}:{bound}. Ctrl-C stops it.", file=sys.stderr, flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2).wait()
        return 130
    return 0
