"""One of two gloo ranks resuming a checkpoint written by another world size, with a stand-in engine: prints
how its resume ended (``resumed`` or the exception's class and message). Arguments: rank, port,
output_dir."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import torch

from w2v_dist import dist
from w2v_dist.checkpoint.commit import Checkpointer


class StandInEngine:
    def load(self, directory: Path, tag: str | None = None, universal: bool = False) -> dict[str, Any]:
        return {"run": {"step": 2}}


if __name__ == "__main__":
    rank, port, output_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2, timeout=datetime.timedelta(seconds=60))
    checkpointer = Checkpointer(output_dir, dist.World(rank, rank, 2), keep_last=2)
    try:
        checkpointer.resume(StandInEngine(), "step_00000002")  # type: ignore[arg-type]
        print(f"rank {rank}: resumed", flush=True)
    except Exception as err:  # the test reads how each rank ended
        print(f"rank {rank}: {type(err).__name__}: {err}", flush=True)
    torch.distributed.destroy_process_group()
