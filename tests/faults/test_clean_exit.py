"""A rank that finished must exit 0. Left to interpreter shutdown, gloo's threads abort some ranks' exits
("terminate called without an active exception", -6: half of the 4-rank runs of a bare torch script here),
which the launcher and SLURM report as a failed job. The framework destroys the group itself, while Python is
whole."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import BIN, REPO, free_port, launch_env

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "faults" / "clean_exit_worker.py")
ENV = launch_env()
FAILED = (1, -signal.SIGABRT)
"""A failing rank's exit: 1, or an abort by gloo's threads at shutdown (the group left alone). A failure
either way."""


def test_finished_ranks_destroy_the_process_group_before_shutdown() -> None:
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           WORKER],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("process group at exit: destroyed") == 2, proc.stdout


def test_after_an_unhandled_exception_the_group_is_left_alone() -> None:
    """A broken NCCL communicator could block its destruction: a failing rank just exits."""
    proc = subprocess.run([sys.executable, WORKER, "raise"], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode in FAILED and "RuntimeError: a rank that fails" in proc.stderr
    assert "process group at exit: alive" in proc.stdout


def test_after_a_collective_failure_the_trainer_leaves_the_group_alone(tmp_path: Path) -> None:
    """The trainer's own route: a peer is killed, the survivor's collective fails and ``train()`` ends the
    process with ``SystemExit``, which (unlike an unhandled exception) leaves ``sys.last_value`` unset."""
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, WORKER, "collective-failure", str(tmp_path)], cwd=REPO,
                              text=True,
                              env=ENV | rendezvous | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    (stdout, stderr), (_, stderr_1) = (rank.communicate(timeout=300) for rank in ranks)
    assert ranks[1].returncode == -signal.SIGKILL, stderr_1[-3000:]
    assert ranks[0].returncode in FAILED and "Another rank has most likely died" in stderr, stderr[-3000:]
    assert "process group at exit: alive" in stdout
