"""Rank, world size and the few collectives the trainer needs. World size 1 takes the same code path.

The process group itself is created by :func:`w2v_dist.engine.init_distributed` (DeepSpeed's
``init_distributed``); this module reads the launcher's environment and wraps ``torch.distributed``.
"""

from __future__ import annotations

import json
import os
import socket
import time
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


class SharedDirectoryError(RuntimeError):
    """``output_dir`` is not one shared directory on every node."""


def register_ranks(directory: Path, world: World) -> None:
    """Collective, at startup: every rank records where it runs (host, pid) in ``directory`` (``<output_dir>/.ranks``),
    and every rank must see every other rank's record of *this* launch. On a cluster where ``output_dir`` is not
    the same shared directory on all nodes, each node would write its own half of every checkpoint; this stops
    the run before that, on all ranks, naming who cannot see whom. The records also let a survivor of a failed
    collective name the host that was lost (:func:`lost_ranks`)."""
    directory.mkdir(parents=True, exist_ok=True)
    launch = all_gather_objects(os.urandom(8).hex())[0]  # rank 0's: one token per launch, stale records never count
    write_record(directory, world, launch)
    barrier()
    unseen = [rank for rank in range(world.size) if _record(directory, rank).get("launch") != launch]
    views = all_gather_objects((socket.gethostname(), unseen))
    blind = {rank: (host, missing) for rank, (host, missing) in enumerate(views) if missing}
    if blind:
        hosts = {rank: host for rank, (host, _) in enumerate(views)}
        detail = "; ".join(f"rank {rank} on {host} cannot see the records of ranks {missing} "
                           f"(on {sorted({hosts[m] for m in missing})})" for rank, (host, missing) in blind.items())
        raise SharedDirectoryError(f"output_dir is not the same shared directory on every node: {detail}. "
                                   f"Each rank wrote {directory}/rank<N>.json; put output_dir on a filesystem every "
                                   "node mounts (NFS, Lustre, GPFS...) at the same path")


def write_record(directory: Path, world: World, launch: str) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "launch": launch}
    tmp = directory / f".rank{world.rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(directory / f"rank{world.rank}.json")


HEARTBEAT_SECONDS = 5.0
_last_beat = 0.0


def heartbeat(directory: Path, world: World) -> None:
    """This rank is alive: the record's mtime, touched at most every few seconds (called every step; on a shared
    filesystem each touch is a round trip to the server, which the step need not wait for every time)."""
    global _last_beat
    now = time.monotonic()
    if now - _last_beat >= HEARTBEAT_SECONDS:
        os.utime(directory / f"rank{world.rank}.json")
        _last_beat = now


def _record(directory: Path, rank: int) -> dict[str, Any]:
    try:
        return dict(json.loads((directory / f"rank{rank}.json").read_text()))
    except (OSError, ValueError):
        return {}


def lost_ranks(directory: Path, world: World) -> str:
    """Which other ranks are gone, as far as this rank can tell: on this host by pid, on other hosts by the age of
    their last heartbeat (the host is named either way)."""
    gone, silent = [], []
    now = time.time()
    for rank in range(world.size):
        where = _record(directory, rank)
        if rank == world.rank or not where:
            continue
        if where["host"] == socket.gethostname():
            if not psutil.pid_exists(where["pid"]):
                gone.append(f"{rank} on {where['host']} (pid {where['pid']})")
        else:
            silent.append((now - (directory / f"rank{rank}.json").stat().st_mtime, f"{rank} on host {where['host']}"))
    parts = [f"rank {', '.join(gone)} exited" if gone else "",
             ", ".join(f"rank {who}: last heartbeat {age:.0f} s ago" for age, who in sorted(silent, reverse=True))]
    return "; ".join(p for p in parts if p) or "no other rank on this host has exited"


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64, exact for counts)."""
    return all_reduce_sum_async(values, device).tolist()


def all_reduce_sum_async(values: list[float], device: torch.device) -> torch.Tensor:
    """Like :func:`all_reduce_sum` but left on the device: no host sync until the caller reads it."""
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device))


def all_reduce_tensor(tensor: torch.Tensor, op: torch_dist.ReduceOp.RedOpType = torch_dist.ReduceOp.SUM
                      ) -> torch.Tensor:
    """Reduce ``tensor`` (sum by default) over all ranks in place (a no-op without a process group); return it."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device), torch_dist.ReduceOp.MAX).tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


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
