"""Starting ranks the way users do, on DeepSpeed's CPU accelerator: one environment, one port, and one
:class:`Job` whose launcher is local DeepSpeed (:class:`Local`), a launcher on every node of a cluster made
of network namespaces (:class:`Nodes`: torchrun, or DeepSpeed's without ssh) or SLURM (:class:`Sbatch`). The
test plays the cluster: it pauses a rank at a chosen moment, signals the job, waits for its end, reads its
log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.cluster import Node
from tests.support.slurm import SlurmCluster
from w2v_dist.dist import free_port
from w2v_dist.faults import pause_env, pause_marker

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAIN = (str(REPO / "train.py"),)
PAUSE_SECONDS = 4.0
WAIT_SECONDS = 600.0
"""How long a job may take to reach a moment or to end: only a hang waits this long, but a start-up (imports,
DeepSpeed's op load) has taken over 4 minutes on a 2-core machine running several suites at once."""


def launch_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of every rank a test starts: ``base`` (default: this process's), DeepSpeed's CPU
    accelerator (gloo), one OpenMP thread per rank (the cores are shared by every rank), no wandb; then
    ``extra``."""
    return {**(os.environ if base is None else base), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", **extra}


def deepspeed(ranks: int, port: int, program: tuple[str, ...] = TRAIN) -> list[str]:
    """``deepspeed --num_gpus N`` on this machine; ``program`` is ``train.py`` or ``--module M`` (with
    ``--no_local_rank`` for an entry point that does not take one)."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), *program]


def run_deepspeed(args: list[str], ranks: int = 2, timeout: float = WAIT_SECONDS,
                  program: tuple[str, ...] = TRAIN) -> subprocess.CompletedProcess[str]:
    """A :class:`Local` job of ``program ARGS`` run to its end, its stdout and stderr apart (a command's
    stdout is its output); on a timeout, the job's stacks."""
    with tempfile.TemporaryDirectory(prefix="w2v-dist-job-") as logs:
        job = Job(Local(ranks, program, apart=True), args, Path(logs))
        (code,) = job.finish(timeout)
        return subprocess.CompletedProcess(["deepspeed", *program, *args], code, job.output(), job.errors())


def run_single(args: list[str], timeout: float = 600, env: dict[str, str] | None = None,
               base_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python train.py ARGS``: one process, no launcher (and DeepSpeed's accelerator left to its
    detection)."""
    full_env = dict(base_env if base_env is not None else os.environ, OMP_NUM_THREADS="2",
                    WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def python_stacks(pid: int) -> str:
    """Every Python thread's stack in ``pid`` and its descendants (py-spy): what a hung job waited on."""
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return "(the job had already exited)"
    dumps = []
    for process in processes:
        try:
            command = " ".join(process.cmdline())[:160]
        except psutil.Error:
            continue
        try:
            dump = subprocess.run([str(BIN / "py-spy"), "dump", "--pid", str(process.pid)],
                                  capture_output=True, text=True, timeout=30)
            dumps.append(f"## {process.pid} {command}\n{dump.stdout}{dump.stderr}")
        except (OSError, subprocess.TimeoutExpired) as err:
            dumps.append(f"## {process.pid} {command}\n(py-spy failed: {err})")
    return "\n".join(dumps)


class Processes:
    """A job started as launcher processes (one per node), each in its own session and with its own log."""

    poll_seconds = 0.05

    def __init__(self, procs: list[subprocess.Popen[bytes]], logs: list[Path],
                 error_logs: list[Path] | None = None) -> None:
        self.procs, self.logs, self.error_logs = procs, logs, error_logs or []

    def running(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def ranks(self) -> list[psutil.Process]:
        """The rank processes: those that run the program itself (``python -u train.py``), not the launchers
        that name it further on; a rank's loader workers are forks of it, with its command line."""
        found = []
        for proc in self.procs:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            found += [p for p in tree if _is_rank(p) and not _is_rank(_parent(p))]
        return found

    def signal(self, sig: signal.Signals, target: str) -> None:
        """``all``: what SLURM does on scancel or a time limit, the signal to every rank and loader worker;
        ``rank<r>``: to that rank only."""
        if target != "all":
            self.rank(int(target.removeprefix("rank"))).send_signal(sig)
            return
        ranks = self.ranks()
        targets = [*ranks, *(child for rank in ranks for child in rank.children(recursive=True))]
        if len(targets) < 2 * len(ranks) or len(ranks) < 2:
            self.kill()
            raise AssertionError(f"expected 2 ranks or more with a loader worker each, found {targets}")
        for process in targets:
            process.send_signal(sig)

    def rank(self, rank: int) -> psutil.Process:
        ranks = [p for p in self.ranks() if _rank_of(p) == rank]
        if len(ranks) != 1:
            self.kill()
            raise AssertionError(f"expected one process of rank {rank}, found {ranks}")
        return ranks[0]

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in self.procs]

    def stacks(self) -> str:
        return "\n".join(python_stacks(proc.pid) for proc in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def output(self, index: int | None) -> str:
        chosen = self.logs if index is None else [self.logs[index]]
        return "\n".join(path.read_text(errors="replace") for path in chosen)

    def errors(self) -> str:
        """What the job wrote to stderr, where it was kept apart from stdout."""
        return "\n".join(path.read_text(errors="replace") for path in self.error_logs)


def _cmdline(process: psutil.Process | None) -> list[str]:
    try:
        return process.cmdline() if process is not None else []
    except psutil.Error:
        return []


def _parent(process: psutil.Process) -> psutil.Process | None:
    try:
        return process.parent()
    except psutil.Error:
        return None


def _is_rank(process: psutil.Process | None) -> bool:
    """``python -u train.py``: the launchers (and the node's shell) name it further on."""
    cmd = _cmdline(process)
    return len(cmd) > 2 and cmd[2] in TRAIN


def _rank_of(process: psutil.Process) -> int | None:
    """The rank's ``--local_rank`` (DeepSpeed's launcher) or ``LOCAL_RANK``."""
    for arg in _cmdline(process):
        if arg.startswith("--local_rank="):
            return int(arg.split("=", 1)[1])
    try:
        return int(process.environ()["LOCAL_RANK"])
    except (psutil.Error, KeyError):
        return None


@dataclass(frozen=True)
class Local:
    """``deepspeed --num_gpus N train.py`` on this machine (``program``: another module or script).
    ``apart``: stdout and stderr in two logs (a command whose stdout is its output), else one."""

    ranks: int = 2
    program: tuple[str, ...] = TRAIN
    apart: bool = False

    def start(self, args: list[str], env: dict[str, str], logs: Path) -> Processes:
        log, error_log = logs / "job.log", logs / "job.err"
        cmd = [*deepspeed(self.ranks, free_port(), self.program), *args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(**env), stdout=open(log, "wb"),
                                stderr=open(error_log, "wb") if self.apart else subprocess.STDOUT,
                                start_new_session=True)
        return Processes([proc], [log], [error_log] if self.apart else [])


@dataclass(frozen=True)
class Nodes:
    """One rank per node, the same command on every node, as a batch script would run it: torchrun's c10d
    rendezvous on node 0 (``launcher="torchrun"``), or DeepSpeed's multi-node launcher without ssh (a
    hostfile, and each node started with its own rank). ``node_tmpfs``: a node-local tmpfs mounted over that
    path there."""

    nodes: tuple[Node, ...]
    launcher: str = "torchrun"
    node_tmpfs: dict[int, Path] = field(default_factory=dict)

    def command(self, port: int, node_rank: int) -> list[str]:
        if self.launcher == "torchrun":
            return [str(BIN / "torchrun"), "--nnodes", str(len(self.nodes)), "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.nodes[0].name}:{port}", "--rdzv-id",
                    f"job{port}", "--max-restarts", "0", "--rdzv-conf", "join_timeout=120"]
        hostfile = Path(tempfile.mkdtemp(prefix="w2v-hostfile-")) / "hostfile"
        hostfile.write_text("".join(f"{node.name} slots=1\n" for node in self.nodes))
        return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
                str(node_rank), "--master_addr", self.nodes[0].name, "--master_port", str(port)]

    def start(self, args: list[str], env: dict[str, str], logs: Path) -> Processes:
        port, procs, paths = free_port(), [], []
        for index, node in enumerate(self.nodes):
            paths.append(logs / f"node{index}.log")
            argv = [*self.command(port, index), *TRAIN, *args]
            procs.append(node.popen(argv, launch_env(**env), paths[-1], cwd=REPO,
                                    tmpfs_at=self.node_tmpfs.get(index)))
        return Processes(procs, paths)


@dataclass(frozen=True)
class Sbatch:
    """``sbatch OPTIONS launch/slurm/train.sbatch CONFIG ARGS`` on ``cluster``: SLURM starts the ranks
    (srun), signals them (``scancel --signal``) and the script requeues a stopped job itself. ``interface``:
    the nodes' network interface (``GLOO_SOCKET_IFNAME``) on a cluster of namespace nodes."""

    cluster: SlurmCluster
    options: tuple[str, ...]
    interface: str | None = None
    script: str = "launch/slurm/train.sbatch"

    def start(self, args: list[str], env: dict[str, str], logs: Path) -> SlurmJob:
        if args[:1] == ["--config"]:  # train.py's arguments: the script takes the config first
            args = args[1:]
        if self.interface:
            env = {"GLOO_SOCKET_IFNAME": self.interface, **env}
        job = self.cluster.sbatch(*self.options, f"--chdir={REPO}", f"--output={logs}/%x-%j.out",
                                  self.script, *args, cwd=REPO, env=slurm_env(self.cluster, **env))
        return SlurmJob(self.cluster, job, logs)


def slurm_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What a job is submitted with: the launch environment on the cluster's, less ``DS_ACCELERATOR`` (the
    script picks it: tests/slurm checks it picks the CPU), with this interpreter when it is not the one the
    scripts default to (``<repo>/.venv``)."""
    env = {k: v for k, v in launch_env(cluster.env).items() if k != "DS_ACCELERATOR"}
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        env["W2V_PYTHON"] = sys.executable
    return env | extra


class SlurmJob:
    """A submitted job, until it has left the queue for good (requeues included)."""

    poll_seconds = 0.5

    def __init__(self, cluster: SlurmCluster, job: str, logs: Path) -> None:
        self.cluster, self.id, self.logs = cluster, job, logs

    def running(self) -> bool:
        return self.cluster.state(self.id) != "" or not self.cluster.finished(self.id)

    def signal(self, sig: signal.Signals, target: str) -> None:
        assert target == "all", "SLURM signals every process of the job's steps"
        self.cluster.run("scancel", f"--signal={sig.name.removeprefix('SIG')}", self.id)

    def wait(self, timeout: float) -> list[int]:
        self.cluster.wait(self.id, timeout=timeout)
        info = self.cluster.job(self.id)
        return [0 if (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0") else 1]

    def stacks(self) -> str:
        return self.cluster.logs()

    def kill(self) -> None:
        if self.running():
            self.cluster.run("scancel", self.id, check=False)

    def log(self) -> Path:
        """The job's log (``%x-%j.out``: the script's job name, the job id)."""
        found = sorted(self.logs.glob(f"*-{self.id}.out"))
        return found[0] if found else self.logs / f"(no log of job {self.id})"

    def output(self, index: int | None) -> str:
        return self.log().read_text(errors="replace") if self.log().is_file() else f"({self.log()} missing)"


Launcher = Local | Nodes | Sbatch


class Job:
    """A job of ``launcher`` running ``train.py ARGS`` (or the launcher's program) in the launch environment
    plus ``env``, its logs in ``logs``. ``pause_at="<moment>[#n]@<rank>"`` holds that rank still there for
    ``pause_seconds`` (``w2v_dist/faults.py``), so the test can deliver a fault at that moment."""

    def __init__(self, launcher: Launcher, args: list[str], logs: Path, pause_at: str | None = None,
                 pause_seconds: float = PAUSE_SECONDS, env: dict[str, str] | None = None) -> None:
        self.launcher, self.logs, self.pause_at = launcher, logs, pause_at
        logs.mkdir(parents=True, exist_ok=True)
        extra = dict(env or {})
        if pause_at:
            moment, rank = pause_at.rsplit("@", 1)
            extra |= pause_env(moment, int(rank), pause_seconds, logs)
        self.run = launcher.start(args, extra, logs)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.run.running(), f"the job ended before {what}:\n{self.output()[-6000:]}"
            if time.monotonic() > deadline:
                stacks = self.run.stacks()
                self.kill()
                raise AssertionError(f"timed out waiting for {what}\n--- stacks ---\n{stacks}\n--- log ---\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(self.run.poll_seconds)

    def wait_for_pause(self) -> None:
        """Until the paused rank has reached its moment (and holds still there)."""
        assert self.pause_at, "the job was started without pause_at"
        moment, rank = self.pause_at.rsplit("@", 1)
        marker = pause_marker(self.logs, moment, int(rank))
        self.wait_for(marker.exists, f"{moment} on rank {rank}")

    def signal(self, sig: signal.Signals, target: str = "all") -> None:
        """``all``: every process of the job but the launchers (what SLURM does on scancel, a time limit or
        ``--signal``), loader workers included; ``rank<r>``: that rank alone."""
        self.run.signal(sig, target)

    def rank(self, rank: int) -> psutil.Process:
        """The process of rank ``rank`` (local rank on its node)."""
        assert isinstance(self.run, Processes), "SLURM's ranks are its to signal"
        return self.run.rank(rank)

    def processes(self) -> list[psutil.Process]:
        """Every rank and its loader workers."""
        assert isinstance(self.run, Processes), "SLURM's ranks are its to signal"
        ranks = self.run.ranks()
        return [*ranks, *(child for rank in ranks for child in rank.children(recursive=True))]

    def finish(self, timeout: float = WAIT_SECONDS) -> list[int]:
        """Every node's exit code (a SLURM job: 0 if it completed with 0, else 1); nothing of it is left."""
        try:
            return self.run.wait(timeout)
        except (subprocess.TimeoutExpired, AssertionError):
            raise AssertionError(f"the job did not end within {timeout} s\n--- stacks ---\n"
                                 f"{self.run.stacks()}\n--- log ---\n{self.output()[-6000:]}") from None
        finally:
            self.kill()

    def kill(self) -> None:
        """End whatever is left of the job (a failed test must not leave it training)."""
        self.run.kill()

    def stacks(self) -> str:
        """Every Python stack of the job (py-spy; a SLURM job: the daemons' logs)."""
        return self.run.stacks()

    def output(self, index: int | None = None) -> str:
        """The log of node ``index`` (a launcher's and its ranks' output), or of every node."""
        return self.run.output(index)

    def errors(self) -> str:
        """What the job wrote to stderr, where its launcher kept that apart (``Local(apart=True)``)."""
        assert isinstance(self.run, Processes), "a SLURM job writes one log"
        return self.run.errors()
