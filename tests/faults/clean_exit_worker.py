"""A rank set up as every w2v-dist entry point sets one up, that takes part in collectives and then ends normally
(or, with ``raise``, with an unhandled exception), leaving the process group to the framework. Says at the very
end of its life whether the group was still there."""

from __future__ import annotations

import atexit
import os
import sys

import torch

from w2v_dist import dist
from w2v_dist.run import start_process


def report() -> None:  # registered first, so it runs after the framework's own exit handlers
    state = "alive" if torch.distributed.is_initialized() else "destroyed"
    os.write(1, f"process group at exit: {state}\n".encode())  # one write: ranks share the launcher's stdout


if __name__ == "__main__":
    atexit.register(report)
    world, _ = start_process(2.0)
    gathered = [torch.zeros(1000) for _ in range(world.size)]
    for _ in range(20):
        torch.distributed.all_gather(gathered, torch.full((1000,), float(world.rank)))
    assert dist.all_gather_objects(world.rank) == list(range(world.size))
    if sys.argv[1:] == ["raise"]:
        raise RuntimeError("a rank that fails")
