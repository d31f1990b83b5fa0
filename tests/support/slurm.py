"""A real SLURM cluster for the launch-script tests, private to the test session: one node on this machine
(tests/slurm), or several nodes made of network namespaces (tests/multinode, :mod:`tests.support.cluster`).

:func:`start_cluster` installs Debian's ``slurm-wlm`` and ``munge`` with apt-get when they are missing (root
only), then starts its own ``munged`` (own key and socket), ``slurmctld`` and ``slurmd`` on free ports with a
``slurm.conf`` in a temporary directory, so it never touches a system SLURM or munge that may be running.
Every daemon and every job process carries ``SLURM_CONF=<that conf>`` in its environment; teardown cancels
the jobs, stops the daemons and then kills whatever process still carries that marker, even when a test
failed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from w2v_dist.dist import free_port

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
REQUIRED = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge")
PACKAGES = ("slurm-wlm", "munge")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "OUT_OF_MEMORY"}
# Variables that would make sbatch/srun think they run inside some other job or launcher.
FOREIGN_ENV = re.compile(r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|PMI_|PMIX_|OMPI_)|^(RANK|WORLD_SIZE|LOCAL_RANK|"
                         r"MASTER_ADDR|MASTER_PORT)$")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _install_slurm() -> str | None:
    """apt-get install slurm-wlm munge when a binary is missing; the reason to skip, or None when all is
    there."""
    missing = [name for name in REQUIRED if _which(name) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"SLURM tests need {', '.join(missing)}: run as root (they install {' '.join(PACKAGES)}) " \
               f"or `sudo apt-get install {' '.join(PACKAGES)}`"
    if _which("apt-get") is None:
        return f"SLURM tests need {', '.join(missing)} and there is no apt-get to install " \
               f"{' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(cmd)}` failed: {err}"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"
    missing = [name for name in REQUIRED if _which(name) is None]
    return f"installed {' '.join(PACKAGES)} but {', '.join(missing)} still missing" if missing else None


def _node_hardware(env: dict[str, str]) -> dict[str, str]:
    """What ``slurmd -C`` reports (CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore,
    RealMemory)."""
    hardware = {"CPUs": str(os.cpu_count() or 1), "RealMemory": "1000"}
    try:
        out = subprocess.run([_which("slurmd") or "slurmd", "-C"], env=env, capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return hardware
    for key, value in re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""):
        if key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"):
            hardware[key] = value
    return hardware


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} missing)"


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``env`` (with ``SLURM_CONF``) is what every SLURM command needs."""

    root: Path
    conf: Path
    env: dict[str, str]
    node: str
    """The first node (where slurmctld runs)."""
    client: Callable[[list[str]], list[str]] = lambda argv: argv
    """How a command reaches slurmctld (in the first node's network namespace on a multi-node cluster)."""
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.client(list(args)), env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.logs()}")
        return proc

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit; the job id (``sbatch --parsable``). ``env`` is added to the cluster's environment."""
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return proc.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        """``"STATE REASON"`` of every task of the job still queued or running; ``""`` once all ended."""
        proc = self.run("squeue", "-h", "-j", job, "-o", "%T %r", check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
        if "Invalid job id" in proc.stderr:  # purged after MinJobAge: long gone
            return ""
        return f"UNKNOWN (squeue: {proc.stderr.strip()})"  # a transient error: keep polling

    def finished(self, job: str) -> bool:
        """Every task of the job is in a final state according to ``scontrol show job`` (no accounting
        needed)."""
        proc = self.run("scontrol", "-o", "show", "job", job, check=False)
        if proc.returncode != 0:
            return "Invalid job id" in proc.stderr  # purged after MinJobAge
        states = re.findall(r"\bJobState=(\w+)", proc.stdout)
        return bool(states) and all(state in FINAL_STATES for state in states)

    def wait(self, job: str, timeout: float = 600, while_running: Callable[[], None] | None = None) -> None:
        """Poll until the job has left the queue for good: squeue shows nothing and scontrol a final state.

        A requeued job stays pending (reason BeginTime) until its old credential expires: ``cred_expire=10``
        in slurm.conf makes that ~20 s instead of ~2 minutes. Forcing ``StartTime=now`` earlier makes slurmd
        refuse the relaunch ("Job credential revoked") and the job fail.
        """
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) != "" or not self.finished(job):
            if time.monotonic() > deadline:
                self.run("scancel", job, check=False)
                raise AssertionError(f"job {job} still '{state}' after {timeout:.0f} s\n{self.logs()}")
            if while_running is not None:
                while_running()
            time.sleep(0.5)

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (kept for MinJobAge after the job ended; an array's 1st task)."""
        out = self.run("scontrol", "-o", "show", "job", job).stdout.splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        logs = sorted((self.root / "log").glob("slurm*.log"))
        return "\n".join(f"--- {path.name}\n{_tail(path)}" for path in logs)


def cpu_job(nodes: int, ranks_per_node: int) -> tuple[str, ...]:
    """``sbatch`` options for ``ranks_per_node`` CPU ranks on each of ``nodes`` nodes of a test cluster (the
    scripts' #SBATCH headers ask for GPU nodes on partition "gpu")."""
    return (f"--nodes={nodes}", f"--ntasks={nodes * ranks_per_node}", f"--ntasks-per-node={ranks_per_node}",
            "--gpus-per-node=0", "--cpus-per-task=1", "--partition=debug", "--time=20")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path} was not written)"


def assert_completed(cluster: SlurmCluster, job: str, log: Path) -> dict[str, str]:
    """``scontrol show job`` of ``job``, which must have completed with exit code 0 (its log otherwise)."""
    info = cluster.job(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{read(log)[-8000:]}"
    return info


def _write_conf(root: Path, nodes: list[tuple[str, str]], hardware: dict[str, str],
                munge_socket: Path) -> Path:
    """``nodes``: (hostname, address); slurmctld runs on the first."""
    conf = root / "slurm.conf"
    node_line = " ".join(f"{k}={v}" for k, v in hardware.items())
    node_lines = "".join(f"NodeName={name} NodeAddr={address} {node_line} State=UNKNOWN\n"
                         for name, address in nodes)
    names = ",".join(name for name, _ in nodes)
    partition = f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE"
    conf.write_text(f"""# Test cluster written by tests/support/slurm.py
ClusterName=w2vtest
SlurmctldHost={nodes[0][0]}({nodes[0][1]})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool' / '%n'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.%n.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
{node_lines}{partition} State=UP
""")
    # No cgroup plugin is configured (proctrack/linuxproc, task/none); this only keeps slurmd from looking
    # for one.
    (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nConstrainCores=no\nConstrainRAMSpace=no\n"
                                      "ConstrainSwapSpace=no\nConstrainDevices=no\n")
    return conf


def _start_munge(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    keydir, rundir = root / "munge-key", root / "munge"
    keydir.mkdir(mode=0o700)
    rundir.mkdir(mode=0o755)
    key = keydir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = rundir / "munge.socket"
    assert len(str(sock)) < 100, f"munge socket path too long for AF_UNIX: {sock}"
    daemon = subprocess.Popen(
        [_which("munged") or "munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={rundir / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
         f"--seed-file={rundir / 'munged.seed'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "log" / "munged.out", "w"),
        start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            break
        if sock.exists():
            cred = subprocess.run([_which("munge") or "munge", "-n", "-S", str(sock)], capture_output=True)
            check = subprocess.run([_which("unmunge") or "unmunge", "-S", str(sock)], input=cred.stdout,
                                   capture_output=True)
            if cred.returncode == 0 and check.returncode == 0:
                return daemon, sock
        time.sleep(0.2)
    daemon.kill()
    daemon.wait()
    raise RuntimeError(f"munged did not come up:\n{_tail(root / 'log' / 'munged.log')}\n"
                       f"{_tail(root / 'log' / 'munged.out')}")


def _processes_with(marker: str) -> list[int]:
    """Pids of processes (other than this one) whose environment holds ``marker`` exactly."""
    pids, needle = [], marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_marked(conf: Path) -> None:
    for pid in _processes_with(f"SLURM_CONF={conf}"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop(cluster: SlurmCluster) -> None:
    """Cancel every job, stop slurmd and slurmctld, kill leftovers carrying our SLURM_CONF, stop munged."""
    try:
        if cluster.daemons.get("slurmctld") is not None and cluster.daemons["slurmctld"].poll() is None:
            jobs = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
            if jobs:
                cluster.run("scancel", *jobs, check=False, timeout=20)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and cluster.run("squeue", "-h", check=False,
                                                                  timeout=20).stdout.strip():
                    time.sleep(0.5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    slurmds = [name for name in cluster.daemons if name.startswith("slurmd")]
    for name in (*slurmds, "slurmctld", "munged"):
        if name == "munged":  # slurmstepd, batch scripts, ranks, slurmscriptd: all carry our SLURM_CONF
            _kill_marked(cluster.conf)
        daemon = cluster.daemons.get(name)
        if daemon is None or daemon.poll() is not None:
            continue
        daemon.terminate()
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    _kill_marked(cluster.conf)


@contextmanager
def start_cluster(root: Path, nodes: list[tuple[str, str]] | None = None,
                  on_node: Callable[[int, list[str]], list[str]] = lambda index, argv: argv
                  ) -> Iterator[SlurmCluster]:
    """A running cluster: ``nodes`` as (hostname, address), default this machine alone; ``on_node(i, argv)``
    wraps a daemon's command to run on node ``i`` (slurmctld on node 0, one slurmd per node). Skips the test
    when SLURM cannot be installed or started here."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests start slurmctld/slurmd as SlurmUser=root: run them as root (CI does)")
    reason = _install_slurm()
    if reason is not None:
        pytest.skip(reason)
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir()
    nodes = nodes or [(socket.gethostname().split(".")[0], "127.0.0.1")]
    for host, _ in nodes:
        (root / "spool" / host).mkdir()
    base_env = {k: v for k, v in os.environ.items() if not FOREIGN_ENV.search(k)}
    base_env["PATH"] = SBIN_PATH
    conf = root / "slurm.conf"
    env = dict(base_env, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root, conf, env, nodes[0][0], client=lambda argv: on_node(0, argv))
    try:
        munged, munge_socket = _start_munge(root, base_env)
        cluster.daemons["munged"] = munged
        _write_conf(root, nodes, _node_hardware(env), munge_socket)
        for name, node, argv in [("slurmctld", 0, ["slurmctld", "-D", "-i", "-f", str(conf)]),
                                 *((f"slurmd.{host}", i, ["slurmd", "-D", "-f", str(conf), "-N", host])
                                   for i, (host, _) in enumerate(nodes))]:
            out = open(root / "log" / f"{name}.out", "w")
            argv[0] = _which(argv[0]) or argv[0]
            cluster.daemons[name] = subprocess.Popen(on_node(node, argv), env=env, stdout=out,
                                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        states = ""
        while time.monotonic() < deadline:
            for name, daemon in cluster.daemons.items():
                if daemon.poll() is not None:
                    raise RuntimeError(f"{name} exited with {daemon.returncode}:\n"
                                       f"{_tail(root / 'log' / f'{name}.out')}\n{cluster.logs()}")
            states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if states == ["idle"] * len(nodes):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"nodes are {states}, not all idle, after 90 s\n{cluster.logs()}")
    except BaseException:
        _stop(cluster)
        raise
    try:
        yield cluster
    finally:
        _stop(cluster)
