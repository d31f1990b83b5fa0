"""Running a 2-rank DeepSpeed job (one loader worker per rank) and hitting it with faults the way a cluster does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from helpers import REPO, check, free_port, metrics, overrides, python_stacks, run_deepspeed
from safetensors.torch import load_file

from w2v_dist.faults import PAUSE_ENV

STEPS = 6
SCHEDULE = {"trainer.max_steps": STEPS, "trainer.eval_every": 3, "trainer.save_every": 2, "trainer.log_every": 1,
            "data.num_workers": 1, "checkpoint.keep_last": 3}
"""Saves at steps 2, 4, 6; dev evaluations at 3 and 6; one training loader worker per rank (dev sets are decoded
in the rank)."""
PAUSE_SECONDS = 4.0
WAIT_SECONDS = 600.0
"""How long a job may take to reach a moment: only a hang waits this long, but a start-up (imports, DeepSpeed's
op load) has taken over 4 minutes on a 2-core machine running several suites at once."""


def job_args(shard_dirs: dict, model: Path, out: Path, **extra: object) -> list[str]:
    return ["--config", "configs/demo.yaml", *overrides(shard_dirs, model, out, **SCHEDULE, **extra)]


def run_to_completion(shard_dirs: dict, model: Path, out: Path, **extra: object) -> subprocess.CompletedProcess[str]:
    proc = run_deepspeed(job_args(shard_dirs, model, out, **extra))
    check(proc)
    return proc


class Job:
    """``deepspeed --num_gpus 2 train.py ...`` in its own session; the test plays the cluster."""

    def __init__(self, args: list[str], markers: Path, pause_at: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.markers = markers
        markers.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", **(env or {}))
        if pause_at:
            moment, rank = pause_at.rsplit("@", 1)
            full_env[PAUSE_ENV] = f"{moment}:{rank}:{PAUSE_SECONDS}:{markers}"
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "train.py"), *args]
        self.log = markers / "job.log"
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.output()[-4000:]}"
            if time.monotonic() > deadline:
                stacks = python_stacks(self.proc.pid)
                self.kill()
                raise AssertionError(f"timed out waiting for {what}\n--- stacks ---\n{stacks}")
            time.sleep(0.05)

    def wait_for_marker(self, moment: str, rank: int) -> None:
        self.wait_for(lambda: (self.markers / f"{moment}.rank{rank}").exists(), f"{moment} on rank {rank}")

    def ranks(self) -> list[psutil.Process]:
        """The rank processes (the launcher's own processes name train.py too, but no ``--local_rank``; a rank's
        loader workers are forks of it, with its command line)."""
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if _is_rank(p) and not _is_rank(p.parent())]

    def processes(self) -> list[psutil.Process]:
        """Every process of the job but the launcher: the ranks and their loader workers."""
        ranks = self.ranks()
        return [*ranks, *(child for rank in ranks for child in rank.children(recursive=True))]

    def rank(self, rank: int) -> psutil.Process:
        ranks = [p for p in self.ranks() if f"--local_rank={rank} " in _cmdline(p)]
        if len(ranks) != 1:
            self.kill()
            raise AssertionError(f"expected one process of rank {rank}, found {ranks}")
        return ranks[0]

    def signal_all(self, sig: signal.Signals) -> int:
        """What SLURM does on scancel or a time limit: the signal to every process of the step."""
        targets = self.processes()
        if len(targets) < 4:
            self.kill()
            raise AssertionError(f"expected 2 ranks with at least one loader worker each, found {targets}")
        for process in targets:
            process.send_signal(sig)
        return len(targets)

    def finish(self, timeout: float = WAIT_SECONDS) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end within {timeout} s\n--- stacks ---\n"
                                 f"{python_stacks(self.proc.pid)}\n--- log ---\n{self.output()[-6000:]}") from None
        finally:
            self.kill()

    def kill(self) -> None:
        """End whatever is left of the job (a failed test must not leave it training)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _cmdline(process: psutil.Process | None) -> str:
    try:
        return " ".join(process.cmdline()) + " " if process is not None else ""
    except psutil.NoSuchProcess:
        return ""


def _is_rank(process: psutil.Process | None) -> bool:
    return " --local_rank=" in _cmdline(process) and "deepspeed.launcher" not in _cmdline(process)


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every training line of ``metrics.jsonl`` in the order written (a relaunch appends)."""
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def logged_steps(out: Path) -> list[int]:
    return [step for step, _ in logged_losses(out)]


def assert_resumed_from(output: str, out: Path, step: int) -> None:
    """The relaunch's log names exactly one resume, from ``out``'s checkpoint of ``step``."""
    resumes = re.findall(r"resumed from (\S+) at step (\d+)", output)
    assert resumes == [(str(out / "checkpoints" / f"step_{step:08d}"), str(step))], (resumes, output[-4000:])


def assert_same_weights(reference: Path, out: Path, steps: list[int] | None = None) -> None:
    """``out`` ends with ``reference``'s weights, and its ``metrics.jsonl`` logged exactly ``steps`` in that order
    (default: 1 to ``STEPS`` once each; an interrupted run then its relaunch log a step twice where the relaunch
    resumed before the last logged step), each with the uninterrupted run's loss at that step."""
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    expected = dict(logged_losses(reference))
    assert logged_steps(reference) == list(range(1, STEPS + 1)), logged_steps(reference)
    logged = logged_losses(out)
    wanted = list(range(1, STEPS + 1)) if steps is None else steps
    assert [step for step, _ in logged] == wanted, f"logged steps {[step for step, _ in logged]}, expected {wanted}"
    for step, loss in logged:
        assert abs(loss - expected[step]) <= 1e-5 * abs(expected[step]), (step, loss, expected[step])
