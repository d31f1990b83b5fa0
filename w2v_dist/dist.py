"""Rank, world size and the few collectives the trainer needs; each rank's record of where it runs, its
heartbeat, and who did not arrive when a collective fails. World size 1 takes the same code path.

A rank's process, its world read from the launcher's environment and its process group are started by
:func:`w2v_dist.process.start_process`; this module wraps ``torch.distributed`` once the group exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class World:
    """This rank's place in its launch (:func:`w2v_dist.process.world_from_env` reads it)."""

    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now: the rendezvous of ranks launched here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PEER_FAILURE_MARKERS = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")


def is_collective_failure(err: BaseException) -> bool:
    """True for what torch.distributed raises when a peer vanishes or a collective times out (gloo raises
    plain RuntimeErrors carrying its source path)."""
    return isinstance(err, torch_dist.DistError) or (
        isinstance(err, RuntimeError) and any(marker in str(err) for marker in _PEER_FAILURE_MARKERS))


class SharedDirectoryError(RuntimeError):
    """``output_dir`` is not one shared directory on every node."""


def register_ranks(directory: Path, world: World) -> None:
    """Collective, at startup: every rank records where it runs (host, pid) in ``directory``
    (``<output_dir>/.ranks``), and every rank must see every other rank's record of *this* launch. On a
    cluster where ``output_dir`` is not the same shared directory on all nodes, each node would write its own
    half of every checkpoint; this stops the run before that, on all ranks, naming who cannot see whom. Then
    each rank keeps its record fresh (:func:`start_heartbeat`), which lets a survivor of a failed collective
    name the rank and host that did not arrive (:func:`lost_ranks`)."""
    directory.mkdir(parents=True, exist_ok=True)
    # rank 0's: one token per launch, stale records never count
    launch = all_gather_objects(os.urandom(8).hex())[0]
    write_record(directory, world, launch)
    barrier()
    unseen = [rank for rank in range(world.size) if _record(directory, rank).get("launch") != launch]
    views = all_gather_objects((socket.gethostname(), unseen))
    blind = {rank: (host, missing) for rank, (host, missing) in enumerate(views) if missing}
    if blind:
        hosts = {rank: host for rank, (host, _) in enumerate(views)}
        detail = "; ".join(f"rank {rank} on {host} cannot see the records of ranks {missing} "
                           f"(on {sorted({hosts[m] for m in missing})})"
                           for rank, (host, missing) in blind.items())
        raise SharedDirectoryError(
            f"output_dir is not the same shared directory on every node: {detail}. Each rank wrote "
            f"{directory}/rank<N>.json; put output_dir on a filesystem every node mounts (NFS, Lustre, "
            "GPFS...) at the same path")
    start_heartbeat(directory, world, launch)


def write_record(directory: Path, world: World, launch: str, where: str = "") -> None:
    """This rank's record: where it runs (host, pid), the launch, the last update it finished and ``where``
    its main thread is (:func:`main_thread_location`). Replaced atomically: a reader never sees half a
    record."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "launch": launch, "step": _step,
              "where": where}
    tmp = directory / f".rank{world.rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(directory / f"rank{world.rank}.json")


HEARTBEAT_SECONDS = 5.0
"""How often each rank's record is rewritten, by a thread of its own (:func:`start_heartbeat`)."""
SILENT_SECONDS = 6 * HEARTBEAT_SECONDS
"""A record older than this belongs to a process that has stopped (SIGSTOP, a frozen VM), died with its node,
or cannot reach ``output_dir``; under it, NFS attribute caching (a few seconds for a file that changes) still
counts as alive."""
_step = 0
_beating: threading.Event | None = None


def heartbeat(step: int) -> None:
    """This rank finished update ``step`` (called every step; no I/O: the heartbeat thread writes it)."""
    global _step
    _step = step


def start_heartbeat(directory: Path, world: World, launch: str) -> None:
    """Rewrite this rank's record every :data:`HEARTBEAT_SECONDS` from a thread, until the process ends.

    From a thread, not the training loop: a rank that waits in a collective for one that stalled, or runs a
    long evaluation or save, still beats, while a stopped or dead process, or a lost node, goes quiet. The
    record also says where the main thread is, which tells a rank stuck elsewhere (a stalled loader worker, a
    hung read) from one waiting in the collective like the survivor (:func:`lost_ranks`)."""
    global _beating
    if _beating is not None:  # a second run in this process (tests): one thread, for the latest
        _beating.set()
    stop = _beating = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):  # a full or unreachable disk: the record ages, as it should
                write_record(directory, world, launch, main_thread_location())

    threading.Thread(target=beat, name="w2v-dist-heartbeat", daemon=True).start()


_PACKAGE = Path(__file__).resolve().parent


def main_thread_location() -> str:
    """Where the main thread is: its innermost frame in w2v-dist, then (after ``<``) the innermost of all
    when that is elsewhere (a collective, a read, a data loader), e.g.
    ``trainer.py:146 fit < dataloader.py:1290 _get_data``."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    own = inner = ""
    while frame is not None:
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
        inner = inner or where
        if _PACKAGE in Path(frame.f_code.co_filename).parents:
            own = where
            break
        frame = frame.f_back
    return own if own == inner else f"{own} < {inner}" if own else inner


def _record(directory: Path, rank: int) -> dict[str, Any]:
    try:
        return dict(json.loads((directory / f"rank{rank}.json").read_text()))
    except (OSError, ValueError):
        return {}


def _process_state(pid: int) -> str:
    """A process on this host: ``exited`` (gone, or a zombie), ``stopped`` (SIGSTOP, a debugger),
    ``disk-sleep`` (blocked in I/O, e.g. a hung NFS read), or ``running`` (anything else)."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "exited"
    if status == psutil.STATUS_ZOMBIE:
        return "exited"
    kept = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_DISK_SLEEP)
    return status if status in kept else "running"


def lost_ranks(directory: Path, world: World, shown: int = 4) -> str:
    """Which other ranks did not arrive, as far as this rank can tell from their records, most likely first:
    those that exited or are stopped (on this host, by pid), those whose heartbeat went quiet (any host), and
    those alive but elsewhere than this rank (its main thread at another place, or at an earlier step). Ranks
    waiting where this one waits are only counted. Every entry names the rank's host."""
    mine = _record(directory, world.rank)
    here = socket.gethostname()
    now = time.time()
    # (how suspect: 0 = surely gone, ..., 4 = waiting too), age, text
    found: list[tuple[int, float, str]] = []
    for rank in range(world.size):
        where = _record(directory, rank)
        if rank == world.rank or not where:
            continue
        try:
            age = now - (directory / f"rank{rank}.json").stat().st_mtime
        except OSError:
            continue
        state = _process_state(where["pid"]) if where["host"] == here else "running"
        if state == "exited":
            found.append((0, age, f"rank {rank} on {where['host']} (pid {where['pid']}) exited"))
            continue
        who = f"rank {rank} on host {where['host']}" + (
            f" (pid {where['pid']}, {state})" if state != "running" else "")
        step, location = where.get("step"), where.get("where")
        detail = f"{who}: last heartbeat {age:.0f} s ago" + (
            f", at step {step}" if step is not None else "") + (f" in {location}" if location else "")
        behind = step is not None and step < mine.get("step", step)
        elsewhere = bool(location and mine.get("where") and location != mine["where"])
        level = 1 if state != "running" else 2 if age > SILENT_SECONDS else 3 if behind or elsewhere else 4
        found.append((level, age, detail))
    found.sort(key=lambda entry: (entry[0], -entry[1]))
    waiting = [text for level, _, text in found if level == 4]
    # nothing suspect: show who was waiting
    listed = [text for level, _, text in found if level < 4] or waiting
    more = len(found) - min(len(listed), shown)
    text = "; ".join(listed[:shown]) + (f"; {more} more" if more > 0 else "")
    return text or "no record of another rank"


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 without a process group)."""
    return (torch_dist.get_rank(), torch_dist.get_world_size()) if is_initialized() else (0, 1)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64, exact for counts)."""
    return all_reduce_sum_async(values, device).tolist()


def all_reduce_sum_async(values: list[float], device: torch.device) -> torch.Tensor:
    """Like :func:`all_reduce_sum` but left on the device: no host sync until the caller reads it."""
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device))


def all_reduce_tensor(tensor: torch.Tensor, op: torch_dist.ReduceOp.RedOpType = torch_dist.ReduceOp.SUM
                      ) -> torch.Tensor:
    """Reduce ``tensor`` (sum by default) over all ranks in place (a no-op without a process group), and
    return it."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    maxima = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce_tensor(maxima, torch_dist.ReduceOp.MAX).tolist()


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
    """``data.num_workers``, with -1 resolved from the cores this rank may use (its affinity, shared between
    the node's ranks when a launcher gives every rank all of them)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cores >= 2 * ranks_here:  # a launcher that did not pin ranks: each gets a share
        cores //= ranks_here
    return max(1, min(8, cores - 1))
