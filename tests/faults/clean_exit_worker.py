"""A rank set up as every w2v-dist entry point sets one up, that takes part in collectives and then ends
normally (or, with ``raise``, with an unhandled exception; with ``collective-failure OUTPUT_DIR``, through
the trainer's own ``train()`` after a peer died), leaving the process group to the framework. Says at the
very end of its life whether the group was still there."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from w2v_dist import dist
from w2v_dist.process import end_process, start_process


def report() -> None:  # registered first, so it runs after the framework's own exit handlers
    state = "alive" if torch.distributed.is_initialized() else "destroyed"
    os.write(1, f"process group at exit: {state}\n".encode())  # one write: ranks share the launcher's stdout


def collectives(world: dist.World) -> None:
    gathered = [torch.zeros(1000) for _ in range(world.size)]
    for _ in range(20):
        torch.distributed.all_gather(gathered, torch.full((1000,), float(world.rank)))
    assert dist.all_gather_objects(world.rank) == list(range(world.size))


def fail_in_a_collective(output_dir: str) -> None:
    """``train()`` itself, with the run reduced to a started process and the trainer to collectives: rank 1
    is killed after the first ones, rank 0's next collective fails, and ``train()`` ends rank 0 as it ends a
    real run, with ``SystemExit``."""
    from w2v_dist import trainer
    from w2v_dist.checkpoint.commit import Checkpointer
    from w2v_dist.config import load_config

    def build_run(cfg: Any, local_rank: int | None) -> Any:
        world, _ = start_process(cfg.trainer.collective_timeout_minutes, local_rank)
        return SimpleNamespace(world=world,
                               checkpointer=Checkpointer(Path(cfg.output_dir), world, keep_last=1))

    class Trainer:
        def __init__(self, cfg: Any, run: Any, stop_signal: Any) -> None:
            self.world = run.world

        def fit(self) -> None:
            collectives(self.world)
            if self.world.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            collectives(self.world)
            raise AssertionError("a collective with a killed peer succeeded")

    trainer.build_run, trainer.Trainer = build_run, Trainer  # type: ignore[assignment]
    trainer.train(load_config(None, [f"output_dir={output_dir}", "trainer.collective_timeout_minutes=2"]))


if __name__ == "__main__":
    atexit.register(report)
    if sys.argv[1:2] == ["collective-failure"]:
        fail_in_a_collective(sys.argv[2])
    world, _ = start_process(2.0)
    collectives(world)
    if sys.argv[1:] == ["raise"]:
        raise RuntimeError("a rank that fails")
    end_process(0)  # as w2v-dist's entry points end
