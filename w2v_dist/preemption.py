"""Graceful stop on SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption).

The handler only records the signal; the trainer folds it into the step's all-reduce so that every rank
stops after the same step, saves together, and asks the batch script to requeue. A second signal while saving
changes nothing, and so does a signal during an evaluation or a save: it is honoured once that is done.
DataLoader workers leave the signals to their rank (:func:`leave_stop_signals_to_the_rank`, forked by
:func:`start_workers`), so the signal SLURM sends to every process of the step cannot kill them mid-batch.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import TypeVar

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals that ask for a checkpoint and a requeue (SLURM's ``--signal``, ``scancel``, time limits,
Kubernetes)."""
REQUEUE_FILE = "REQUEUE"
"""Written in ``output_dir`` after a preemption checkpoint; ``launch/slurm/train.sbatch`` requeues the
job."""
T = TypeVar("T")


class StopSignal:
    def __init__(self) -> None:
        self.received: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None


def request_requeue(output_dir: Path, step: int, reason: str) -> Path:
    path = output_dir / REQUEUE_FILE
    path.write_text(f"step {step}: stopped by {reason}; checkpoint saved, resume with the same command\n")
    return path


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGUSR1 unless the DataLoader itself sends SIGTERM to shut them down (the
    DataLoader's ``worker_init_fn``).

    SLURM (and ``kill -- -PGID``) signals every process of the job, workers included. PyTorch's worker
    handler dies on a SIGTERM that its parent did not send, and the rank then fails at its next batch
    ("DataLoader worker exited unexpectedly") before it can checkpoint. The rank process alone decides when
    to stop (:class:`StopSignal`). A Python handler cannot see the sender, so the signals are blocked and a
    thread takes them with ``sigwaitinfo``, which names it: a worker the DataLoader is terminating still
    exits.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(os.getppid(),), daemon=True,
                     name="stop-signals").start()


def start_workers(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)``, with the stop signals blocked while its workers are forked: each worker starts with
    them blocked, so a SIGTERM to every process of the job (SLURM) cannot kill a worker in the moments before
    :func:`leave_stop_signals_to_the_rank` runs in it. A signal meant for the rank meanwhile waits, and is
    delivered to it as soon as the workers are started."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _take_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)
