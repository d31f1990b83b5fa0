"""A rank that stalls mid-step (SIGSTOP: what a hung GPU or a stuck NFS read looks like from outside) ends
the job within ``trainer.collective_timeout_minutes``, DeepSpeed's own collectives included, and the survivor
names it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.launch import REPO, Job, Local, launch_env
from tests.support.runs import job_args

pytestmark = pytest.mark.slow
TIMEOUT_MINUTES = 1


@pytest.fixture(scope="module")
def comm_op_built() -> None:
    """DeepSpeed's CPU all-reduce op built (or loaded) before a job whose ranks would wait for a build in
    progress only as long as their 1-minute collective timeout (``process.build_cpu_comm_op``)."""
    subprocess.run([sys.executable, "-c",
                    "from w2v_dist.process import build_cpu_comm_op; build_cpu_comm_op(1800)"],
                   cwd=REPO, env=launch_env(), check=True, timeout=1900)


def test_deepspeeds_groups_get_the_collective_timeout() -> None:
    """DeepSpeed creates its data-parallel group with ``new_group()`` and no timeout: torch's default (30 min
    on gloo) unless ``init_distributed`` made ours the default."""
    script = ("import torch\nfrom deepspeed.utils import groups\n"
              "from w2v_dist.process import start_process\nstart_process(5.0)\n"
              "for group in (torch.distributed.group.WORLD, groups._get_data_parallel_group(),\n"
              "              torch.distributed.new_group()):\n"
              "    print(group._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["300.0"] * 3, proc.stdout


@pytest.mark.parametrize("stopped", ["rank", "loader-worker"])
def test_a_stalled_rank_ends_the_job_within_the_timeout_and_is_named(stopped: str, shard_dirs: dict,
                                                                     tiny_model: Path, tmp_path: Path,
                                                                     comm_op_built: None) -> None:
    """``rank``: rank 1 is stopped before its backward at step 3, while rank 0 goes on into DeepSpeed's
    gradient reduction. ``loader-worker``: rank 1's loader worker is stopped after step 2; rank 1 waits for
    batches while rank 0 waits in the next step's first all-reduce. Rank 0 must fail within the timeout (+60
    s), naming rank 1, its host, and that it is stopped or where it waits; once everything is let go, the
    whole job ends and leaves no process behind."""
    # A worker that prepares batches 4 ahead (the default) would let rank 1 finish the run without it.
    extra = {"trainer.collective_timeout_minutes": TIMEOUT_MINUTES} | (
        {"data.prefetch_factor": 1} if stopped == "loader-worker" else {})
    job = Job(Local(), job_args(shard_dirs, tiny_model, tmp_path / "run", **extra), tmp_path / "logs",
              pause_at="backward#3@1" if stopped == "rank" else "step#2@1")
    try:
        job.wait_for_pause()
        stalled = job.rank(1)
        workers = stalled.children()
        assert len(workers) == 1, workers
        target = stalled if stopped == "rank" else workers[0]
        target.suspend()
        stopped_at = time.monotonic()
        survivor, everyone = job.rank(0), job.processes()
        try:
            survivor.wait(timeout=TIMEOUT_MINUTES * 60 + 60)
        except psutil.TimeoutExpired:
            raise AssertionError(f"rank 0 still runs {TIMEOUT_MINUTES * 60 + 60} s after the stop\n"
                                 "--- stacks ---\n"
                                 f"{job.stacks()}\n--- log ---\n{job.output()[-4000:]}") from None
        waited = time.monotonic() - stopped_at
        target.resume()
        codes = job.finish(timeout=120)
    finally:
        job.kill()  # after a failed assertion above: the job must not outlive the test
    output = job.output()
    assert codes != [0] and waited >= TIMEOUT_MINUTES * 60 - 10, (codes, waited, output[-3000:])
    who = f"Another rank has most likely died or stalled (rank 1 on host {socket.gethostname()}"
    if stopped == "rank":
        assert f"{who} (pid {stalled.pid}, stopped): last heartbeat" in output, output[-4000:]
    else:  # alive and beating, waiting for its batches (fit's next(batches)); rank 0 waits in a collective
        assert re.search(re.escape(who)
                         + r": last heartbeat \d+ s ago, at step \d+ in trainer\.py:\d+ \S+ < ",
                         output), output[-4000:]
    left = [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of the job left behind: {left}"
    print(f"{stopped} stopped: rank 0 failed {waited:.0f} s later (timeout {TIMEOUT_MINUTES * 60} s)")
