"""The ``cluster`` fixture: PostgreSQL, an MLflow server and three worker hosts on network namespaces.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2) or PostgreSQL's server
binaries are missing. Everything it starts is stopped, and every namespace and link removed, when the
module's tests end, also after a failure.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.cluster import Cluster, Postgres, postgres_bin, start_mlflow
from tests.multihost.netns import NetnsUnavailable, Network, check_netns


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    try:
        check_netns()
    except NetnsUnavailable as exc:
        pytest.skip(f"multi-host tests need network namespaces: {exc}")
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("multi-host tests need PostgreSQL server binaries (initdb, postgres): apt install postgresql")
    work = Path(tempfile.mkdtemp(prefix="hpo-multihost-"))
    net = Network()
    postgres = None
    try:
        db_host, mlflow_host = net.add_host("db"), net.add_host("mlflow")
        workers = [net.add_host(name) for name in ("host-a", "host-b", "host-c")]
        postgres = Postgres(net, db_host, binaries)
        start_mlflow(net, mlflow_host, work / "mlflow")
        yield Cluster(net, postgres, f"http://{mlflow_host.address}:5000", workers, work)
    finally:
        if postgres is not None:
            postgres.close()
        net.close()
        shutil.rmtree(work, ignore_errors=True)
