"""Graceful stop on SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption).

The handler only records the signal; the trainer folds it into the step's all-reduce so that every rank
stops after the same step, saves together, and asks the batch script to requeue. A second signal while saving
changes nothing, and so does a signal during an evaluation or a save: it is honoured once that is done.
DataLoader workers leave the signals to their rank (:func:`w2v_dist.data.loader.leave_stop_signals_to_the_rank`),
so the signal SLURM sends to every process of the step cannot kill them mid-batch.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals that ask for a checkpoint and a requeue (SLURM's ``--signal``, ``scancel``, time limits, Kubernetes)."""
REQUEUE_FILE = "REQUEUE"
"""Written in ``output_dir`` after a preemption checkpoint; ``launch/slurm/train.sbatch`` requeues the job."""


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
