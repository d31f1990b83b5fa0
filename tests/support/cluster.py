"""A cluster of "nodes" on one machine: Linux network namespaces joined by a veth pair or a bridge, each with
its own hostname (a UTS namespace per process tree) and address, names resolved through
``/etc/netns/<ns>/hosts``.

Traffic stays between these namespaces; everything is removed on exit, processes first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

IFNAME = "w2vnet"
"""The node's interface name, the same inside every namespace (GLOO_SOCKET_IFNAME)."""


@dataclass(frozen=True)
class Node:
    name: str
    """Its hostname, resolvable on every node."""
    namespace: str
    address: str

    def command(self, argv: list[str], tmpfs_at: Path | None = None) -> list[str]:
        """``argv`` run inside this node: its network namespace, its own hostname and its ``/etc/hosts`` (in
        a private mount namespace); with ``tmpfs_at``, that path is a fresh node-local tmpfs. Unlike ``ip
        netns exec``, /sys stays the machine's (slurmd needs its cgroup filesystem)."""
        setup = [f"mount --bind /etc/netns/{self.namespace}/hosts /etc/hosts", f"hostname {self.name}"]
        if tmpfs_at:
            setup.append(f"mount -t tmpfs -o size=64m w2vlocal {tmpfs_at}")
        return ["nsenter", f"--net=/run/netns/{self.namespace}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", " && ".join(setup) + ' && exec "$@"', "--", *argv]

    def popen(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
              tmpfs_at: Path | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(argv, tmpfs_at), env={**env, "GLOO_SOCKET_IFNAME": IFNAME},
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Every process on this node (what a node failure or an OOM-killed cgroup looks like)."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def can_make_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and UTS namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"w2vprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextmanager
def two_nodes(tag: str = "") -> Iterator[tuple[Node, Node]]:
    """Nodes ``w2vnode0`` and ``w2vnode1`` on a private /24, joined by a veth pair."""
    suffix = f"{os.getpid() % 10000}{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    nodes = (Node("w2vnode0", f"w2v{suffix}n0", f"{subnet}.1"),
             Node("w2vnode1", f"w2v{suffix}n1", f"{subnet}.2"))
    ends = (f"w2v{suffix}a", f"w2v{suffix}b")
    hosts = "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.name}\n" for n in nodes)
    try:
        for node in nodes:
            _ip("netns", "add", node.namespace)
            Path("/etc/netns", node.namespace).mkdir(parents=True, exist_ok=True)
            Path("/etc/netns", node.namespace, "hosts").write_text(hosts)
            _ip("-n", node.namespace, "link", "set", "lo", "up")
        _ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for node, end in zip(nodes, ends):
            _ip("link", "set", end, "netns", node.namespace)
            _ip("-n", node.namespace, "link", "set", end, "name", IFNAME)
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", IFNAME)
            _ip("-n", node.namespace, "link", "set", IFNAME, "up")
        yield nodes
    finally:
        for node in nodes:
            node.kill_all()
        deadline = time.monotonic() + 10
        while any(node.pids() for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        for node in nodes:
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns", node.namespace), ignore_errors=True)
