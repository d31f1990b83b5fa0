"""The fault matrix (docs/reliability.md): real 2-rank DeepSpeed on CPU, one loader worker per rank, faults
delivered at chosen moments the way a cluster delivers them. Every cell checks what was saved and that the
relaunched command ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from harness import STEPS, Job, assert_resumed_from, assert_same_weights, job_args, logged_steps, run_to_completion
from helpers import metrics

from w2v_dist.checkpoint.commit import MANIFEST, Checkpointer
from w2v_dist.dist import World

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(shard_dirs: dict, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every cell is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_completion(shard_dirs, tiny_model, out)
    return out


def stopped_cleanly(job: Job, out: Path) -> int:
    """A stop request's outcome: exit 0, one checkpoint at the stop step written by both ranks, REQUEUE."""
    assert job.finish() == 0, job.output()[-4000:]
    output = job.output()
    assert "exited unexpectedly" not in output and "Traceback" not in output, output[-4000:]
    step = logged_steps(out)[-1]
    assert step < STEPS, "the run should have stopped early"
    assert logged_steps(out) == list(range(1, step + 1))
    tag = f"step_{step:08d}"
    assert (out / "checkpoints" / "latest").read_text() == tag
    manifests = [json.loads((out / "checkpoints" / tag / MANIFEST.format(rank=r)).read_text()) for r in (0, 1)]
    assert [m["step"] for m in manifests] == [step, step], "both ranks must stop after the same step"
    assert (out / "REQUEUE").read_text().startswith(f"step {step}: stopped by")
    assert not (out / "final").exists()
    return step


def relaunch_matches_reference(shard_dirs: dict, model: Path, out: Path, reference: Path, resumed_at: int) -> None:
    """The same command again resumes from the checkpoint of step ``resumed_at``, logs the steps after it (after
    those the interrupted run logged) with the uninterrupted run's losses, and ends with its weights."""
    interrupted = logged_steps(out)
    proc = run_to_completion(shard_dirs, model, out)
    assert_resumed_from(proc.stderr, out, resumed_at)
    assert not (out / "REQUEUE").exists()
    assert_same_weights(reference, out, steps=[*interrupted, *range(resumed_at + 1, STEPS + 1)])


SIGNAL_CELLS = [
    # (signal, sent to, moment: "<pause point>[#n]@<rank>", see w2v_dist/faults.py)
    ("SIGTERM", "all", "started@0"),
    ("SIGTERM", "all", "step#1@0"),
    ("SIGTERM", "all", "eval@0"),
    ("SIGTERM", "all", "save@0"),
    ("SIGTERM", "all", "save@1"),
    ("SIGUSR1", "all", "step#2@1"),
    ("SIGUSR1", "all", "eval@1"),
    ("SIGUSR1", "rank1", "step#4@1"),
    ("SIGTERM", "rank1", "save@0"),
]


@pytest.mark.parametrize(("sig", "target", "moment"), SIGNAL_CELLS,
                         ids=[f"{s}-{t}-{m.replace('@', '-rank')}" for s, t, m in SIGNAL_CELLS])
def test_stop_signal_checkpoints_requeues_and_resumes_exactly(shard_dirs: dict, tiny_model: Path, tmp_path: Path,
                                                              reference: Path, sig: str, target: str,
                                                              moment: str) -> None:
    out = tmp_path / "run"
    job = Job(job_args(shard_dirs, tiny_model, out), tmp_path / "markers", pause_at=moment)
    name, rank = moment.split("@")
    job.wait_for_marker(name.split("#")[0], int(rank))
    signum = signal.Signals[sig]
    if target == "all":
        job.signal_all(signum)
        job.signal_all(signum)  # a second signal changes nothing
    else:
        job.rank(1).send_signal(signum)
    step = stopped_cleanly(job, out)
    # a signal during a step is read at the next step's all-reduce; during an evaluation or a save, right after it
    expected = {"started": 1, "step#1": 2, "step#2": 2, "step#4": 4, "eval": 3, "save": 2}[name]
    assert step == expected, (step, expected)
    relaunch_matches_reference(shard_dirs, tiny_model, out, reference, resumed_at=step)


def test_stop_signal_during_the_final_export_lets_the_run_finish(shard_dirs: dict, tiny_model: Path,
                                                                 tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    job = Job(job_args(shard_dirs, tiny_model, out), tmp_path / "markers", pause_at="export-final@0")
    job.wait_for_marker("export-final", 0)
    job.signal_all(signal.SIGTERM)
    assert job.finish() == 0, job.output()[-4000:]
    assert not (out / "REQUEUE").exists(), "a finished run has nothing to requeue"
    assert_same_weights(reference, out)


KILL_CELLS = [("step#3", 1), ("save#2", 0), ("save#2", 1), ("export-final", 0)]


@pytest.mark.parametrize(("moment", "rank"), KILL_CELLS, ids=[f"{m.replace('#', '')}-rank{r}" for m, r in KILL_CELLS])
def test_a_killed_rank_fails_the_job_keeps_latest_complete_and_the_relaunch_resumes(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path, moment: str, rank: int) -> None:
    out = tmp_path / "run"
    job = Job(job_args(shard_dirs, tiny_model, out), tmp_path / "markers", pause_at=f"{moment}@{rank}")
    job.wait_for_marker(moment.split("#")[0], rank)
    victim = job.rank(rank)
    victim_pid = victim.pid
    victim.kill()
    code = job.finish(timeout=120)  # bounded: the launcher sees the death at once
    assert code != 0
    assert f"{victim_pid}" in job.output() or "return code = -9" in job.output(), job.output()[-3000:]
    checkpointer = Checkpointer(out, World(0, 0, 2), keep_last=3)
    latest = checkpointer.latest_tag()
    assert latest is not None and not checkpointer.missing(latest), "latest must name a complete checkpoint"
    if moment in ("step#3", "save#2"):
        assert latest == "step_00000002"
    if moment == "save#2":
        assert checkpointer.missing("step_00000004"), "the torn save at step 4 must be recognised as incomplete"
    if moment == "export-final":
        assert latest == f"step_{STEPS:08d}" and not (out / "final").exists()
    relaunch_matches_reference(shard_dirs, tiny_model, out, reference, resumed_at=int(latest.removeprefix("step_")))


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Path:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_fails_clearly_and_the_relaunch_resumes(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path, small_filesystem: Path) -> None:
    out = small_filesystem / "run"
    job = Job(job_args(shard_dirs, tiny_model, out), tmp_path / "markers", pause_at="step#4@0")
    job.wait_for_marker("step", 0)  # the checkpoint at step 2 is complete; fill the disk before step 4's is saved
    filler = small_filesystem / "filler"
    checkpoint_bytes = sum(p.stat().st_size for p in (out / "checkpoints" / "step_00000002").iterdir())
    free = shutil.disk_usage(small_filesystem).free
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, free - checkpoint_bytes // 4))  # room for metrics lines, not a checkpoint
    code = job.finish(timeout=120)
    output = job.output()
    assert code != 0
    assert "No space left on device" in output and "latest still names step_00000002" in output, output[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    filler.unlink()
    relaunch_matches_reference(shard_dirs, tiny_model, out, reference, resumed_at=2)


def test_remote_shards_cut_mid_transfer_change_nothing_but_the_retry_count(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, reference: Path) -> None:
    """Training and dev shards from a loopback server that cuts every shard's first two transfers mid-file."""
    from helpers import http_server

    out = tmp_path / "run"
    with http_server(shard_dirs["train-clean-100"].parent, drops=2) as url:
        run_to_completion(shard_dirs, tiny_model, out, **{
            "data.train_shards": f"{url}/train-clean-100", "data.dev_shards": f"{{dev-clean: {url}/dev-clean}}",
            "data.remote_backoff_seconds": 0.05})
    retries = [r["loader_skips"].get("shard_retries", 0) for r in metrics(out) if "loader_skips" in r]
    assert retries[-1] > 0, retries
    assert_same_weights(reference, out)
    dev = [r for r in metrics(out) if "dev/dev-clean/utterances" in r]
    assert [r["dev/dev-clean/utterances"] for r in dev] == [12, 12]
