"""The fault matrix (docs/reliability.md): real 2-rank DeepSpeed on CPU, one loader worker per rank, faults
delivered at chosen moments the way a cluster delivers them. Every cell checks what was saved and that the
relaunched command ends with the weights of an uninterrupted run.

The preemption scenario (a stop signal -> checkpoint -> REQUEUE -> the same command again -> the
uninterrupted run) is written once, as data, and run by every launcher: local DeepSpeed, torchrun on two
nodes, sbatch on one node and on two (there SLURM signals the job and the script requeues it)."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import IFNAME
from tests.support.data import fill_disk, http_server, small_filesystem
from tests.support.launch import Job, Launcher, Local, Nodes, Sbatch, SlurmJob, run_deepspeed
from tests.support.runs import (
    STEPS,
    assert_resumed_from,
    assert_same_weights,
    check,
    job_args,
    logged_steps,
    metrics,
    overrides,
)
from tests.support.slurm import assert_completed, cpu_job
from w2v_dist.checkpoint.commit import MANIFEST, Checkpointer
from w2v_dist.dist import World

pytestmark = pytest.mark.slow


def stopped_cleanly(job: Job, out: Path, steps: int, ranks: int) -> int:
    """A stop request's outcome: exit 0, one checkpoint at the stop step written by every rank, REQUEUE."""
    assert set(job.finish()) == {0}, job.output()[-4000:]
    output = job.output()
    assert "exited unexpectedly" not in output and "Traceback" not in output, output[-4000:]
    step = logged_steps(out)[-1]
    assert step < steps, "the run should have stopped early"
    assert logged_steps(out) == list(range(1, step + 1))
    tag = f"step_{step:08d}"
    assert (out / "checkpoints" / "latest").read_text() == tag
    manifests = [json.loads((out / "checkpoints" / tag / MANIFEST.format(rank=r)).read_text())
                 for r in range(ranks)]
    assert [m["step"] for m in manifests] == [step] * ranks, "every rank must stop after the same step"
    assert (out / "REQUEUE").read_text().startswith(f"step {step}: stopped by")
    assert not (out / "final").exists()
    return step


def relaunch(launcher: Launcher, args: list[str], out: Path, logs: Path, resumed_at: int) -> None:
    """The same command again (what a requeue runs): it resumes from the checkpoint of step ``resumed_at``,
    runs to the end and leaves no REQUEUE."""
    job = Job(launcher, args, logs)
    assert set(job.finish()) == {0}, job.output()[-6000:]
    assert_resumed_from(job.output(), out, resumed_at)
    assert not (out / "REQUEUE").exists()


def relaunch_matches_reference(shard_dirs: dict, model: Path, out: Path, reference: Path, resumed_at: int,
                               logs: Path) -> None:
    """Relaunched from the checkpoint of step ``resumed_at``, the run logs the steps after it (after those
    the interrupted run logged) with the uninterrupted run's losses, and ends with its weights."""
    interrupted = logged_steps(out)
    relaunch(Local(), job_args(shard_dirs, model, out), out, logs, resumed_at)
    assert_same_weights(reference, out, steps=[*interrupted, *range(resumed_at + 1, STEPS + 1)])


@dataclass(frozen=True)
class Launch:
    """How a preemption case starts its job: the cluster fixture it needs, the launcher on it, the run (the
    fault matrix's, compared with the uninterrupted one, unless ``steps`` names another), how long the paused
    rank holds still, whether the launcher requeues the job itself (SLURM) or the test relaunches it."""

    fixture: str | None
    launcher: Callable[[Any], Launcher]
    ranks: int = 2
    steps: int = STEPS
    extra: dict[str, object] = field(default_factory=dict)
    pause_seconds: float = 4.0
    requeues: bool = False

    def args(self, shard_dirs: dict, model: Path, out: Path) -> list[str]:
        if self.steps == STEPS:
            return job_args(shard_dirs, model, out)
        return ["--config", "configs/demo.yaml", *overrides(shard_dirs, model, out, **self.extra)]


LAUNCHES = {
    "deepspeed": Launch(None, lambda _: Local()),
    "torchrun-2nodes": Launch("nodes", Nodes, pause_seconds=6.0),
    # 40 steps, no evaluation, no periodic save: the job is signalled once 3 steps are logged, with no pause.
    "sbatch-1node": Launch("slurm_cluster", lambda cluster: Sbatch(cluster, cpu_job(1, 2)), steps=40,
                           extra={"trainer.max_steps": 40, "trainer.eval_every": 0, "trainer.save_every": 0},
                           requeues=True),
    "sbatch-2nodes": Launch("slurm_two_nodes", lambda cluster: Sbatch(cluster, cpu_job(2, 1), IFNAME),
                            pause_seconds=8.0, requeues=True),
}
PREEMPTIONS = [
    # (launcher, signal, sent to, when: a pause "<point>[#n]@<rank>" (w2v_dist/faults.py) or "<n> steps"
    # logged, the step it stops after: a signal during a step is read at the next step's all-reduce; during
    # an evaluation or a save, right after it; None: where SLURM's signal lands)
    ("deepspeed", "SIGTERM", "all", "started@0", 1),
    ("deepspeed", "SIGTERM", "all", "step#1@0", 2),
    ("deepspeed", "SIGTERM", "all", "eval@0", 3),
    ("deepspeed", "SIGTERM", "all", "save@0", 2),
    ("deepspeed", "SIGTERM", "all", "save@1", 2),
    ("deepspeed", "SIGUSR1", "all", "step#2@1", 2),
    ("deepspeed", "SIGUSR1", "all", "eval@1", 3),
    ("deepspeed", "SIGUSR1", "rank1", "step#4@1", 4),
    ("deepspeed", "SIGTERM", "rank1", "save@0", 2),
    ("torchrun-2nodes", "SIGUSR1", "all", "step#3@0", 3),
    ("sbatch-1node", "SIGUSR1", "all", "3 steps", None),
    ("sbatch-2nodes", "SIGUSR1", "all", "step#2@0", None),
]
HEAVY = {"torchrun-2nodes": [pytest.mark.multinode], "sbatch-1node": [pytest.mark.slurm],
         "sbatch-2nodes": [pytest.mark.multinode, pytest.mark.slurm]}


@pytest.mark.parametrize(("launch", "sig", "target", "when", "stops_at"), [
    pytest.param(*case, marks=HEAVY.get(case[0], []),
                 id=f"{case[0]}-{case[1]}-{case[2]}-{case[3].replace('@', '-rank').replace(' ', '')}")
    for case in PREEMPTIONS])
def test_stop_signal_checkpoints_requeues_and_resumes_exactly(
        request: pytest.FixtureRequest, shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path,
        launch: str, sig: str, target: str, when: str, stops_at: int | None) -> None:
    how = LAUNCHES[launch]
    launcher = how.launcher(request.getfixturevalue(how.fixture) if how.fixture else None)
    out = tmp_path / "run"
    args = how.args(shard_dirs, tiny_model, out)
    paused = "@" in when
    job = Job(launcher, args, tmp_path / "logs", pause_at=when if paused else None,
              pause_seconds=how.pause_seconds)
    if paused:
        job.wait_for_pause()
    else:
        job.wait_for(lambda: len(logged_steps(out)) >= int(when.split()[0]), f"{when} logged")
    after = int(re.sub(r"\D", "", when.split("@")[0]) or 0)  # the steps done when the signal is sent
    job.signal(signal.Signals[sig], target)
    if how.requeues:
        assert job.finish(timeout=900) == [0], job.output()[-6000:]
        assert isinstance(job.run, SlurmJob)
        output = job.output()
        info = assert_completed(job.run.cluster, job.run.id, job.run.log())
        assert info["Restarts"] == "1", f"expected one requeue: {info}\n{output[-6000:]}"
        stopped = re.search(rf"stopped at step (\d+) \({sig}\)", output)
        assert stopped, f"the trainer did not report a {sig} stop\n{output[-6000:]}"
        step = int(stopped.group(1))
        assert f"requeued job {job.run.id}" in output and "(restart 1)" in output, output[-6000:]
        assert_resumed_from(output, out, step)
        assert (out / "checkpoints" / f"step_{step:08d}").is_dir()
        assert not (out / "REQUEUE").exists()
    else:  # the test is the scheduler: the job stops, then the same command runs again
        if target == "all":
            job.signal(signal.Signals[sig], target)  # a second signal changes nothing
        step = stopped_cleanly(job, out, how.steps, how.ranks)
        relaunch(launcher, args, out, tmp_path / "relaunch", resumed_at=step)
    assert after <= step < how.steps and step == (stops_at or step), (step, stops_at)
    assert (out / "checkpoints" / "latest").read_text() == f"step_{how.steps:08d}"
    assert (out / "final" / "model.safetensors").is_file()
    if how.steps == STEPS:
        assert_same_weights(reference, out)  # steps 1 to the stop, then the rest, each once
    else:  # no uninterrupted run of this one: every step logged once
        assert logged_steps(out) == list(range(1, how.steps + 1))


def test_stop_signal_during_the_final_export_lets_the_run_finish(shard_dirs: dict, tiny_model: Path,
                                                                 tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    job = Job(Local(), job_args(shard_dirs, tiny_model, out), tmp_path / "logs", pause_at="export-final@0")
    job.wait_for_pause()
    job.signal(signal.SIGTERM)
    assert job.finish() == [0], job.output()[-4000:]
    assert not (out / "REQUEUE").exists(), "a finished run has nothing to requeue"
    assert_same_weights(reference, out)


KILL_CELLS = [("step#3", 1), ("save#2", 0), ("save#2", 1), ("export-final", 0)]


@pytest.mark.parametrize(("moment", "rank"), KILL_CELLS,
                         ids=[f"{m.replace('#', '')}-rank{r}" for m, r in KILL_CELLS])
def test_a_killed_rank_fails_the_job_keeps_latest_complete_and_the_relaunch_resumes(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path, moment: str, rank: int) -> None:
    out = tmp_path / "run"
    job = Job(Local(), job_args(shard_dirs, tiny_model, out), tmp_path / "logs", pause_at=f"{moment}@{rank}")
    job.wait_for_pause()
    victim = job.rank(rank)
    victim_pid = victim.pid
    victim.kill()
    assert job.finish(timeout=120) != [0]  # bounded: the launcher sees the death at once
    assert f"{victim_pid}" in job.output() or "return code = -9" in job.output(), job.output()[-3000:]
    checkpointer = Checkpointer(out, World(0, 0, 2), keep_last=3)
    latest = checkpointer.latest_tag()
    assert latest is not None and not checkpointer.missing(latest), "latest must name a complete checkpoint"
    if moment in ("step#3", "save#2"):
        assert latest == "step_00000002"
    if moment == "save#2":
        assert checkpointer.missing("step_00000004"), "the torn save at step 4 must count as incomplete"
    if moment == "export-final":
        assert latest == f"step_{STEPS:08d}" and not (out / "final").exists()
    relaunch_matches_reference(shard_dirs, tiny_model, out, reference, int(latest.removeprefix("step_")),
                               tmp_path / "relaunch")


def test_a_full_disk_during_a_save_fails_clearly_and_the_relaunch_resumes(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path) -> None:
    with small_filesystem(tmp_path / "tmpfs", "48m") as disk:
        out = disk / "run"
        job = Job(Local(), job_args(shard_dirs, tiny_model, out), tmp_path / "logs", pause_at="step#4@0")
        job.wait_for_pause()  # the checkpoint at step 2 is complete; fill the disk before step 4's is saved
        checkpoint_bytes = sum(p.stat().st_size for p in (out / "checkpoints" / "step_00000002").iterdir())
        filler = fill_disk(disk, leave=checkpoint_bytes // 4)  # room for metrics lines, not a checkpoint
        assert job.finish(timeout=120) != [0]
        output = job.output()
        assert "No space left on device" in output, output[-4000:]
        assert "latest still names step_00000002" in output, output[-4000:]
        assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
        filler.unlink()
        relaunch_matches_reference(shard_dirs, tiny_model, out, reference, 2, tmp_path / "relaunch")


def test_remote_shards_cut_mid_transfer_change_nothing_but_the_retry_count(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path) -> None:
    """Training and dev shards from a loopback server that cuts each shard's first two transfers mid-file."""
    out = tmp_path / "run"
    with http_server(shard_dirs["train-clean-100"].parent, drops=2) as url:
        check(run_deepspeed(job_args(shard_dirs, tiny_model, out, **{
            "data.train_shards": f"{url}/train-clean-100",
            "data.dev_shards": f"{{dev-clean: {url}/dev-clean}}", "data.remote_backoff_seconds": 0.05})))
    retries = [r["loader_skips"].get("shard_retries", 0) for r in metrics(out) if "loader_skips" in r]
    assert retries[-1] > 0, retries
    assert_same_weights(reference, out)
    dev = [r for r in metrics(out) if "dev/dev-clean/utterances" in r]
    assert [r["dev/dev-clean/utterances"] for r in dev] == [12, 12]
