"""``sbatch --nodes=2 launch/slurm/train.sbatch`` on a two-node SLURM cluster: one slurmd in each network-namespace
node, slurmctld on the first, munge shared. Training with 2 ranks per node, and SIGUSR1 preemption of the 2-node
job → checkpoint → requeue → resume to the weights of an uninterrupted run."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cluster import IFNAME, Node
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slurm"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from harness import SCHEDULE, assert_resumed_from, assert_same_weights, run_to_completion  # noqa: E402
from helpers import REPO, overrides  # noqa: E402
from slurmlib import SlurmCluster, start_cluster  # noqa: E402
from test_slurm import assert_completed, job_env, metrics, read  # noqa: E402

from w2v_dist.faults import PAUSE_ENV  # noqa: E402

pytestmark = pytest.mark.slow


def two_node_job(ranks_per_node: int) -> list[str]:
    return ["--nodes=2", f"--ntasks-per-node={ranks_per_node}", "--gpus-per-node=0", "--cpus-per-task=1",
            "--partition=debug", "--time=20"]


@pytest.fixture(scope="module")
def slurm_two_nodes(nodes: tuple[Node, Node], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with start_cluster(tmp_path_factory.mktemp("slurm2"), [(n.name, n.address) for n in nodes],
                       on_node=lambda index, argv: nodes[index].command(argv)) as cluster:
        yield cluster


def submit(cluster: SlurmCluster, ranks_per_node: int, out: Path, logs: Path, args: list[str],
           env: dict[str, str] | None = None) -> str:
    return cluster.sbatch(*two_node_job(ranks_per_node), f"--chdir={REPO}", f"--output={logs}/%x-%j.out",
                          "launch/slurm/train.sbatch", "configs/demo.yaml", *args, cwd=REPO,
                          env={**job_env(), "GLOO_SOCKET_IFNAME": IFNAME, **(env or {})})


def test_train_sbatch_on_two_nodes_runs_two_ranks_per_node(slurm_two_nodes: SlurmCluster, shard_dirs: dict,
                                                            tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = submit(slurm_two_nodes, 2, out, tmp_path, overrides(shard_dirs, tiny_model, out, **{
        "trainer.max_steps": 3, "trainer.eval_every": 0, "trainer.save_every": 0}))
    slurm_two_nodes.wait(job, timeout=900)
    log = tmp_path / f"w2v-train-{job}.out"
    assert_completed(slurm_two_nodes, job, log)
    text = read(log)
    assert "world: 4 rank(s)" in text and "master w2vnode0:" in text, text[-4000:]
    hosts = {line.split('"host": "')[1].split('"')[0] for line in
             (p.read_text() for p in (out / ".ranks").glob("rank*.json"))}
    assert hosts == {"w2vnode0", "w2vnode1"}
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert (out / "final" / "model.safetensors").is_file()


def test_two_node_job_preempted_by_sigusr1_requeues_and_ends_with_the_uninterrupted_weights(
        slurm_two_nodes: SlurmCluster, shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run_to_completion(shard_dirs, tiny_model, reference)  # 2 ranks on one node: the same world as 1 per node
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    # Rank 0 holds still for a few seconds at its second step, so the signal lands mid-run on every machine.
    job = submit(slurm_two_nodes, 1, out, tmp_path, overrides(shard_dirs, tiny_model, out, **SCHEDULE),
                 env={PAUSE_ENV: f"step#2:0:8:{markers}"})
    signalled = False

    def signal_at_step_two() -> None:
        nonlocal signalled
        if not signalled and (markers / "step.rank0").exists():
            slurm_two_nodes.run("scancel", "--signal=USR1", job)
            signalled = True

    slurm_two_nodes.wait(job, timeout=900, while_running=signal_at_step_two)
    log = tmp_path / f"w2v-train-{job}.out"
    text = read(log)
    assert signalled, text[-6000:]
    info = assert_completed(slurm_two_nodes, job, log)
    assert info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    stopped = re.search(r"stopped at step (\d+) \(SIGUSR1\)", text)
    assert stopped, text[-6000:]
    assert_resumed_from(text, out, int(stopped.group(1)))
    assert_same_weights(reference, out)  # steps 1 to the stop, then the rest


def test_a_job_requeued_onto_one_node_resumes_from_its_two_node_checkpoint(
        slurm_two_nodes: SlurmCluster, shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """``sbatch --nodes=1-2``: started on both (free) nodes, one rank each; preempted while a node goes down
    (drained), the requeued job comes back on the one node left: it resumes with 1 rank (grad_accum 1 → 2, ZeRO-2
    state through DeepSpeed's universal checkpoint) and ends with the weights of an uninterrupted 2-rank run.
    Nobody edits the job, the command, the config or the checkpoint."""
    extra = {"deepspeed.zero_stage": 2, **SCHEDULE}
    reference = tmp_path / "reference"
    run_to_completion(shard_dirs, tiny_model, reference, **{"deepspeed.zero_stage": 2})
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    deadline = time.monotonic() + 120  # a node range takes the nodes free at the start: wait for both
    while slurm_two_nodes.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split() != ["idle", "idle"]:
        assert time.monotonic() < deadline, slurm_two_nodes.run("sinfo", "-N", check=False).stdout
        time.sleep(1)
    job = slurm_two_nodes.sbatch(
        "--nodes=1-2", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=debug", "--time=20", f"--chdir={REPO}",
        f"--output={tmp_path}/%x-%j.out", "launch/slurm/train.sbatch", "configs/demo.yaml",
        *overrides(shard_dirs, tiny_model, out, **extra), cwd=REPO,
        env={**job_env(), "GLOO_SOCKET_IFNAME": IFNAME, PAUSE_ENV: f"step#2:0:8:{markers}"})
    signalled = False

    def preempt_while_a_node_goes_down() -> None:
        nonlocal signalled
        if not signalled and (markers / "step.rank0").exists():
            slurm_two_nodes.run("scontrol", "update", "nodename=w2vnode1", "state=drain", "reason=elastic-test")
            slurm_two_nodes.run("scancel", "--signal=USR1", job)
            signalled = True

    try:
        slurm_two_nodes.wait(job, timeout=900, while_running=preempt_while_a_node_goes_down)
    finally:
        slurm_two_nodes.run("scontrol", "update", "nodename=w2vnode1", "state=resume", check=False)
    log = tmp_path / f"w2v-train-{job}.out"
    text = read(log)
    assert signalled, text[-6000:]
    info = assert_completed(slurm_two_nodes, job, log)
    assert info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    assert "(restart 0) on 2 node(s)" in text and "(restart 1) on 1 node(s)" in text, text[-6000:]
    assert re.search(r"resuming step \d+ from 2 rank\(s\) on 1: grad_accum 1 -> 2", text), text[-6000:]
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
