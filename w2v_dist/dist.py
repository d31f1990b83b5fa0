"""Rank, world size and the few collectives the trainer needs. World size 1 takes the same code path.

The process group itself is created by :func:`w2v_dist.engine.init_distributed` (DeepSpeed's
``init_distributed``); this module reads the launcher's environment and wraps ``torch.distributed``.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def world_from_env(local_rank_arg: int | None = None) -> World:
    """Ranks from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID...); else one process.

    Missing rendezvous variables are filled in so that the same code runs with no launcher at all.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    rank = int(env.setdefault("RANK", "0"))
    size = int(env.setdefault("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    env["LOCAL_RANK"] = str(local)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if size > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set; start ranks with deepspeed, torchrun "
                               "or launch/slurm/train.sbatch")
        env["MASTER_PORT"] = str(free_port())
    return World(rank, local, size)


_PEER_FAILURE_MARKERS = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")


def is_collective_failure(err: BaseException) -> bool:
    """True for what torch.distributed raises when a peer vanishes or a collective times out (gloo raises plain
    RuntimeErrors carrying its source path)."""
    return isinstance(err, torch_dist.DistError) or (
        isinstance(err, RuntimeError) and any(marker in str(err) for marker in _PEER_FAILURE_MARKERS))


def register_rank(directory: Path, world: World) -> None:
    """Record where this rank runs, so that a survivor of a failed collective can name who died."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank{world.rank}.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def dead_ranks(directory: Path, world: World) -> str:
    """Which other ranks have exited, as far as this host can tell (ranks on other hosts: unknown)."""
    gone, unknown = [], []
    for rank in range(world.size):
        path = directory / f"rank{rank}.json"
        if rank == world.rank or not path.is_file():
            continue
        where = json.loads(path.read_text())
        if where["host"] != socket.gethostname():
            unknown.append(f"{rank} ({where['host']})")
        elif not psutil.pid_exists(where["pid"]):
            gone.append(f"{rank} (pid {where['pid']})")
    parts = [f"rank {', '.join(gone)} exited" if gone else "", f"ranks on other hosts: {', '.join(unknown)}"
             if unknown else ""]
    return "; ".join(p for p in parts if p) or "no other rank on this host has exited"


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64, exact for counts)."""
    return all_reduce_sum_async(values, device).tolist()


def all_reduce_sum_async(values: list[float], device: torch.device) -> torch.Tensor:
    """Like :func:`all_reduce_sum` but left on the device: no host sync until the caller reads it."""
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device))


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op without a process group) and return it."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def global_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def loader_workers(requested: int) -> int:
    """``data.num_workers``, with -1 resolved from the cores this rank may use (its affinity, shared between the
    node's ranks when a launcher gives every rank all of them)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cores >= 2 * ranks_here:  # a launcher that did not pin ranks: each gets a share
        cores //= ranks_here
    return max(1, min(8, cores - 1))
