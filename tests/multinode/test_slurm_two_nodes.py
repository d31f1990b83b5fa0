"""``sbatch --nodes=2 launch/slurm/train.sbatch`` on a two-node SLURM cluster: one slurmd in each
network-namespace node, slurmctld on the first, munge shared. Training with 2 ranks per node, and SIGUSR1
preemption of the 2-node job → checkpoint → requeue → resume to the weights of an uninterrupted run is
one launcher's case of the preemption scenario (tests/faults/test_fault_matrix.py); here, a job requeued onto
one node of the two."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.cluster import IFNAME
from tests.support.launch import Job, Sbatch, run_deepspeed
from tests.support.runs import assert_same_weights, check, job_args, metrics, overrides
from tests.support.slurm import SlurmCluster, assert_completed, cpu_job

pytestmark = pytest.mark.slow


def test_train_sbatch_on_two_nodes_runs_two_ranks_per_node(slurm_two_nodes: SlurmCluster, shard_dirs: dict,
                                                            tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    short = {"trainer.max_steps": 3, "trainer.eval_every": 0, "trainer.save_every": 0}
    args = ["--config", "configs/demo.yaml", *overrides(shard_dirs, tiny_model, out, **short)]
    job = Job(Sbatch(slurm_two_nodes, cpu_job(2, 2), IFNAME), args, tmp_path)
    job.finish(timeout=900)
    assert_completed(slurm_two_nodes, job.run.id, job.run.log())
    text = job.output()
    assert "world: 4 rank(s)" in text and "master w2vnode0:" in text, text[-4000:]
    hosts = {line.split('"host": "')[1].split('"')[0] for line in
             (p.read_text() for p in (out / ".ranks").glob("rank*.json"))}
    assert hosts == {"w2vnode0", "w2vnode1"}
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert (out / "final" / "model.safetensors").is_file()


def test_a_job_requeued_onto_one_node_resumes_from_its_two_node_checkpoint(
        slurm_two_nodes: SlurmCluster, shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """``sbatch --nodes=1-2``: started on both (free) nodes, one rank each; preempted while a node goes down
    (drained), the requeued job comes back on the one node left: it resumes with 1 rank (grad_accum 1 → 2,
    ZeRO-2 state through DeepSpeed's universal checkpoint) and ends with the weights of an uninterrupted
    2-rank run. Nobody edits the job, the command, the config or the checkpoint."""
    reference = tmp_path / "reference"
    check(run_deepspeed(job_args(shard_dirs, tiny_model, reference, **{"deepspeed.zero_stage": 2})))
    out = tmp_path / "run"
    deadline = time.monotonic() + 120  # a node range takes the nodes free at the start: wait for both
    while slurm_two_nodes.run("sinfo", "-h", "-N", "-o", "%T",
                              check=False).stdout.split() != ["idle", "idle"]:
        assert time.monotonic() < deadline, slurm_two_nodes.run("sinfo", "-N", check=False).stdout
        time.sleep(1)
    options = ("--nodes=1-2", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=debug", "--time=20")
    job = Job(Sbatch(slurm_two_nodes, options, IFNAME), job_args(shard_dirs, tiny_model, out, **{
        "deepspeed.zero_stage": 2}), tmp_path, pause_at="step#2@0", pause_seconds=8)
    try:
        job.wait_for_pause()
        slurm_two_nodes.run("scontrol", "update", "nodename=w2vnode1", "state=drain", "reason=elastic-test")
        job.signal(signal.SIGUSR1)
        job.finish(timeout=900)
    finally:
        slurm_two_nodes.run("scontrol", "update", "nodename=w2vnode1", "state=resume", check=False)
    text = job.output()
    info = assert_completed(slurm_two_nodes, job.run.id, job.run.log())
    assert info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    assert "(restart 0) on 2 node(s)" in text and "(restart 1) on 1 node(s)" in text, text[-6000:]
    assert re.search(r"resuming step \d+ from 2 rank\(s\) on 1: grad_accum 1 -> 2", text), text[-6000:]
    assert_same_weights(reference, out, losses=False, rtol=1e-5)
