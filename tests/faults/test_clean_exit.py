"""A rank that finished must exit 0. Left to interpreter shutdown, gloo's threads abort some ranks' exits
("terminate called without an active exception", -6: half of the 4-rank runs of a bare torch script here), which
the launcher and SLURM report as a failed job. The framework destroys the group itself, while Python is whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "faults" / "clean_exit_worker.py")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def test_finished_ranks_destroy_the_process_group_before_shutdown() -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), WORKER], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("process group at exit: destroyed") == 2, proc.stdout


def test_after_an_unhandled_exception_the_group_is_left_alone() -> None:
    """A broken NCCL communicator could block its destruction: a failing rank just exits."""
    proc = subprocess.run([sys.executable, WORKER, "raise"], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "RuntimeError: a rank that fails" in proc.stderr
    assert "process group at exit: alive" in proc.stdout
