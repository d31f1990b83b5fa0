"""Graceful stop on SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption).

The handler only records the signal; the trainer folds it into the step's all-reduce so that every rank
stops after the same step, saves together, and asks the batch script to requeue. A second signal while saving
changes nothing. DataLoader workers fork after the handler is installed and inherit it, so the signal SLURM
sends to every process of the step cannot kill them mid-batch.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

REQUEUE_FILE = "REQUEUE"
"""Written in ``output_dir`` after a preemption checkpoint; ``launch/slurm/train.sbatch`` requeues the job."""


class StopSignal:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.received: str | None = None
        for sig in signals:
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
