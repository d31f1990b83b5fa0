"""Two nodes made of network namespaces (tests/multinode/cluster.py), one rank per node through torchrun's c10d
rendezvous: training, SIGUSR1 preemption and resume, a lost node, and an output_dir that is not shared."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cluster import Node, can_make_namespaces

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from harness import STEPS, assert_resumed_from, assert_same_weights, job_args, logged_steps, run_to_completion  # noqa: E402
from helpers import REPO  # noqa: E402

from w2v_dist.faults import PAUSE_ENV  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(can_make_namespaces()), reason=str(can_make_namespaces()))]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
PORTS = itertools.count(29400)
WAIT_SECONDS = 300


@pytest.fixture(scope="module")
def reference(shard_dirs: dict, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job on one node (2 ranks under the DeepSpeed launcher), uninterrupted."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    run_to_completion(shard_dirs, tiny_model, out)
    return out


def torchrun(nodes: tuple[Node, Node], port: int, node_rank: int) -> list[str]:
    """torchrun's c10d rendezvous on node 0: the same command on every node."""
    return [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{nodes[0].name}:{port}", "--rdzv-id", f"job{port}", "--max-restarts", "0",
            "--rdzv-conf", "join_timeout=120"]


def deepspeed_no_ssh(nodes: tuple[Node, Node], port: int, node_rank: int) -> list[str]:
    """DeepSpeed's multi-node launcher without ssh: a hostfile, and each node started with its own rank."""
    hostfile = Path(tempfile.mkdtemp(prefix="w2v-hostfile-")) / "hostfile"
    hostfile.write_text("".join(f"{node.name} slots=1\n" for node in nodes))
    return [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", nodes[0].name, "--master_port", str(port)]


class TwoNodeJob:
    """One rank per node, started on both nodes by ``launcher`` (torchrun by default), as a batch script would."""

    def __init__(self, nodes: tuple[Node, Node], args: list[str], logs: Path, env: dict[str, str] | None = None,
                 node1_tmpfs_at: Path | None = None, launcher: Callable[..., list[str]] = torchrun) -> None:
        self.nodes, self.logs = nodes, logs
        logs.mkdir(parents=True, exist_ok=True)
        port = next(PORTS)
        base = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", **(env or {}))
        self.procs = []
        for index, node in enumerate(nodes):
            argv = [*launcher(nodes, port, index), str(REPO / "train.py"), *args]
            self.procs.append(node.popen(argv, base, logs / f"node{index}.log", cwd=REPO,
                                         tmpfs_at=node1_tmpfs_at if index == 1 else None))

    def finish(self) -> list[int]:
        deadline = time.monotonic() + WAIT_SECONDS
        try:
            return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in self.procs]
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the 2-node job did not end in {WAIT_SECONDS} s\n{self.output()}") from None
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def log(self, index: int) -> str:
        """Node ``index``'s whole log (its launcher's and its rank's output)."""
        return (self.logs / f"node{index}.log").read_text(errors="replace")

    def output(self, index: int | None = None) -> str:
        chosen = range(len(self.nodes)) if index is None else [index]
        return "\n".join(f"--- node{i} ---\n{self.log(i)[-5000:]}" for i in chosen)

    def job_processes(self, node: Node) -> list[psutil.Process]:
        """The ranks on ``node`` and their loader workers: what SLURM signals, torchrun's agent excluded."""
        found = []
        for pid in node.pids():
            try:
                process = psutil.Process(pid)
                if "train.py" in " ".join(process.cmdline()) and "torchrun" not in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
        return found

    def wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not path.exists():
            assert all(p.poll() is None for p in self.procs), f"the job ended before {path.name}\n{self.output()}"
            assert time.monotonic() < deadline, f"timed out waiting for {path}\n{self.output()}"
            time.sleep(0.05)


def pause_env(markers: Path, moment: str, rank: int, seconds: float = 6.0) -> dict[str, str]:
    markers.mkdir(parents=True, exist_ok=True)
    return {PAUSE_ENV: f"{moment}:{rank}:{seconds}:{markers}"}


def test_torchrun_on_two_nodes_trains_the_weights_of_one_node(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = TwoNodeJob(nodes, job_args(shard_dirs, tiny_model, out), tmp_path / "logs")
    assert job.finish() == [0, 0], job.output()
    records = sorted(p.read_text() for p in (out / ".ranks").glob("rank*.json"))
    assert len(records) == 2 and '"host": "w2vnode0"' in records[0] + records[1] and "w2vnode1" in "".join(records)
    assert_same_weights(reference, out)


def test_deepspeeds_multi_node_launch_without_ssh_trains_the_same_weights(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = TwoNodeJob(nodes, job_args(shard_dirs, tiny_model, out), tmp_path / "logs", launcher=deepspeed_no_ssh)
    assert job.finish() == [0, 0], job.output()
    assert_same_weights(reference, out)


def test_sigusr1_to_the_two_node_job_checkpoints_requeues_and_resumes(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    markers = tmp_path / "markers"
    job = TwoNodeJob(nodes, job_args(shard_dirs, tiny_model, out), tmp_path / "logs",
                     env=pause_env(markers, "step#3", 0))
    job.wait_for(markers / "step.rank0")
    targets = [p for node in nodes for p in job.job_processes(node)]
    assert len(targets) >= 4, targets  # a rank and a loader worker on each node
    for process in targets:
        process.send_signal(signal.SIGUSR1)
    assert job.finish() == [0, 0], job.output()
    assert (out / "REQUEUE").exists() and logged_steps(out)[-1] == 3
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    resumed = TwoNodeJob(nodes, job_args(shard_dirs, tiny_model, out), tmp_path / "logs2")
    assert resumed.finish() == [0, 0], resumed.output()
    assert_resumed_from(resumed.log(0), out, 3)
    assert not (out / "REQUEUE").exists()
    assert_same_weights(reference, out)  # steps 1 to 3, then 4 to STEPS


def test_a_lost_node_is_named_by_the_survivor_and_the_same_command_resumes(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    markers = tmp_path / "markers"
    args = job_args(shard_dirs, tiny_model, out, **{"trainer.collective_timeout_minutes": 1.0})
    job = TwoNodeJob(nodes, args, tmp_path / "logs", env=pause_env(markers, "step#3", 1, seconds=30))
    job.wait_for(markers / "step.rank1")
    started = time.monotonic()
    assert nodes[1].kill_all() > 0  # the whole node: agent, rank, loader worker
    codes = job.finish()
    assert time.monotonic() - started < 90, "the survivor must exit within the collective timeout"
    assert codes[0] != 0, job.output()
    survivor = job.output(0)
    assert "Another rank has most likely died" in survivor and "rank 1 on host w2vnode1" in survivor, survivor
    interrupted = logged_steps(out)
    relaunched = TwoNodeJob(nodes, args, tmp_path / "logs2")
    assert relaunched.finish() == [0, 0], relaunched.output()
    assert_resumed_from(relaunched.log(0), out, 2)
    assert_same_weights(reference, out, steps=[*interrupted, *range(3, STEPS + 1)])


def test_an_output_dir_that_is_not_shared_stops_every_node_at_startup(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """Node 1 sees its own (empty) filesystem at output_dir's path: a tmpfs mounted over it in a private mount
    namespace, what a node-local /scratch looks like."""
    out = tmp_path / "run"
    out.mkdir()
    args = job_args(shard_dirs, tiny_model, out)
    job = TwoNodeJob(nodes, args, tmp_path / "logs", node1_tmpfs_at=out)
    codes = job.finish()
    assert codes[0] != 0 and codes[1] != 0, job.output()
    # The whole log: when node 0's torchrun (the rendezvous store) exits first, node 1's torchrun prints a trace
    # longer than output()'s tail after the rank's message.
    for index in (0, 1):
        assert "output_dir is not the same shared directory on every node" in job.log(index), job.output()
    assert not (out / "checkpoints").exists()
