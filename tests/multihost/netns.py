"""Hosts made of Linux network namespaces, for tests that need several machines on one.

One bridge in the root namespace (with an address, so the test itself can reach every host); each host is a
namespace with one veth pair plugged into the bridge and its own address. ``partition`` pulls the host's
cable (the bridge-side end goes down: packets are dropped silently, as on a real network, and TCP must time
out); ``heal`` plugs it back. Processes started on a host run under ``ip netns exec`` in their own process
group, optionally with their own hostname (a UTS namespace), and are killed with their groups at ``close``.
Everything created is named with a random prefix and removed at ``close``, also after a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no iproute2, or a kernel/container that refuses)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def check_netns() -> None:
    """Raise NetnsUnavailable with the reason when this machine cannot make namespaces."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        raise NetnsUnavailable("`ip` (iproute2) or `unshare` (util-linux) is not installed")
    probe = f"hpoprobe{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {done.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    cable: str  # the bridge-side veth end

    def prefix(self, hostname: str | None = None) -> list[str]:
        """The command prefix that runs a command on this host (with its own hostname if given)."""
        cmd = ["ip", "netns", "exec", self.namespace]
        if hostname:
            cmd += ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"]
        return cmd


@dataclass
class Network:
    prefix: str = field(default_factory=lambda: f"mh{uuid.uuid4().hex[:5]}")
    subnet: str = field(default_factory=lambda: f"10.{random.randint(100, 250)}.{random.randint(1, 250)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    bridge: str = ""

    def __post_init__(self) -> None:
        self.bridge = f"{self.prefix}br"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 2
        ns, cable, inside = f"{self.prefix}-{name}", f"{self.prefix}{index}h", f"{self.prefix}{index}n"
        _ip("netns", "add", ns)
        host = Host(name, ns, f"{self.subnet}.{index}", cable)
        self.hosts[name] = host
        _ip("link", "add", cable, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", cable, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def partition(self, host: Host) -> None:
        _ip("link", "set", host.cable, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.cable, "up")

    def start(self, host: Host, cmd: Sequence[str], *, log: Path, hostname: str | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[Any]:
        """Start ``cmd`` on ``host`` in its own process group, output to ``log``."""
        out: IO[str]
        with log.open("a") as out:
            proc = subprocess.Popen([*host.prefix(hostname), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            subprocess.run(["ip", "link", "del", host.cable], capture_output=True)  # gone with its peer, normally
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
