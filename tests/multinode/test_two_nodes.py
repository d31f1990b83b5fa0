"""Two nodes made of network namespaces (tests/support/cluster.py), one rank per node through torchrun's
c10d rendezvous: training, a lost node, and an output_dir that is not shared. SIGUSR1 preemption and resume
on two nodes is one launcher's case of the preemption scenario (tests/faults/test_fault_matrix.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.cluster import Node
from tests.support.launch import Job, Nodes
from tests.support.runs import STEPS, assert_resumed_from, assert_same_weights, job_args, logged_steps

pytestmark = pytest.mark.slow


def test_torchrun_on_two_nodes_trains_the_weights_of_one_node(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = Job(Nodes(nodes), job_args(shard_dirs, tiny_model, out), tmp_path / "logs")
    assert job.finish() == [0, 0], job.output()
    records = sorted(p.read_text() for p in (out / ".ranks").glob("rank*.json"))
    assert len(records) == 2 and '"host": "w2vnode0"' in records[0] + records[1]
    assert "w2vnode1" in "".join(records)
    assert_same_weights(reference, out)


def test_deepspeeds_multi_node_launch_without_ssh_trains_the_same_weights(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = Job(Nodes(nodes, launcher="deepspeed"), job_args(shard_dirs, tiny_model, out), tmp_path / "logs")
    assert job.finish() == [0, 0], job.output()
    assert_same_weights(reference, out)


def test_a_lost_node_is_named_by_the_survivor_and_the_same_command_resumes(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, reference: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = job_args(shard_dirs, tiny_model, out, **{"trainer.collective_timeout_minutes": 1.0})
    job = Job(Nodes(nodes), args, tmp_path / "logs", pause_at="step#3@1", pause_seconds=30)
    job.wait_for_pause()
    started = time.monotonic()
    assert nodes[1].kill_all() > 0  # the whole node: agent, rank, loader worker
    codes = job.finish()
    assert time.monotonic() - started < 90, "the survivor must exit within the collective timeout"
    assert codes[0] != 0, job.output()
    survivor = job.output(0)
    assert "Another rank has most likely died" in survivor, survivor
    assert "rank 1 on host w2vnode1" in survivor, survivor
    interrupted = logged_steps(out)
    relaunched = Job(Nodes(nodes), args, tmp_path / "logs2")
    assert relaunched.finish() == [0, 0], relaunched.output()
    assert_resumed_from(relaunched.output(0), out, 2)
    assert_same_weights(reference, out, steps=[*interrupted, *range(3, STEPS + 1)])


def test_an_output_dir_that_is_not_shared_stops_every_node_at_startup(
        nodes: tuple[Node, Node], shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """Node 1 sees its own (empty) filesystem at output_dir's path: a tmpfs mounted over it in a private
    mount namespace, what a node-local /scratch looks like."""
    out = tmp_path / "run"
    out.mkdir()
    args = job_args(shard_dirs, tiny_model, out)
    job = Job(Nodes(nodes, node_tmpfs={1: out}), args, tmp_path / "logs")
    codes = job.finish()
    assert codes[0] != 0 and codes[1] != 0, job.output()
    # The whole log: when node 0's torchrun (the rendezvous store) exits first, node 1's torchrun prints a
    # trace longer than output()'s tail after the rank's message.
    for index in (0, 1):
        assert "output_dir is not the same shared directory on every node" in job.output(index), job.output()
    assert not (out / "checkpoints").exists()
