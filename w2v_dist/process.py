"""Starting a rank's process, and ending it: the world and the rendezvous from the launcher's environment,
the console, the device, the process group with its timeout and teardown, DeepSpeed's CPU comm op, and the
accelerator checks. Training, ``evaluate`` and the benchmarks all start here (:func:`start_process`), on one
machine or many: torchrun, the DeepSpeed launcher and SLURM's srun differ only in what :func:`world_from_env`
and :func:`rendezvous_from_env` read."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import fcntl
import io
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch

from w2v_dist.dist import World, free_port
from w2v_dist.lock import OutputDirLock
from w2v_dist.logging import setup_console

log = logging.getLogger("w2v_dist.process")


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one launch meet: rank 0's TCP store at ``addr:port``."""

    addr: str
    port: int

    @property
    def init_method(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr  # an IPv6 address
        return f"tcp://{host}:{self.port}"


def world_from_env(local_rank_arg: int | None = None, env: Mapping[str, str] = os.environ) -> World:
    """This rank's place as its launcher gave it: torchrun or deepspeed (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), SLURM's srun when ``RANK`` is unset (``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_LOCALID``), else one process (``--local_rank``, when given, names its device). Reads ``env``
    and writes nothing."""
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        return World(int(env["SLURM_PROCID"]), int(local), int(env["SLURM_NTASKS"]))
    local = env.get("LOCAL_RANK", str(local_rank_arg if local_rank_arg is not None else 0))
    return World(int(env.get("RANK", "0")), int(local), int(env.get("WORLD_SIZE", "1")))


def rendezvous_from_env(world: World, env: Mapping[str, str] = os.environ) -> Rendezvous:
    """``MASTER_ADDR:MASTER_PORT`` as the launcher (or ``launch/slurm/train.sbatch``) set them. One process
    without a launcher meets itself on a free local port. Reads ``env`` and writes nothing."""
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in env:
        return Rendezvous(addr, int(env["MASTER_PORT"]))
    if world.size > 1:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set; start ranks with deepspeed, torchrun "
                           "or launch/slurm/train.sbatch")
    return Rendezvous(addr, free_port())


def publish_launch(world: World, rendezvous: Rendezvous) -> None:
    """The one place where a process writes its launch into ``os.environ``, for readers that look nowhere
    else. ``LOCAL_RANK``: DeepSpeed's engine refuses to start without it, and ZeRO-3 gathers parameters on
    ``device_name(os.environ["LOCAL_RANK"])``; srun and a run without a launcher set none. ``MASTER_ADDR``
    and ``MASTER_PORT``: :func:`w2v_dist.lock.launch_id` tells two launches apart by them, and a run without
    a launcher has none (its port is the free one :func:`rendezvous_from_env` chose). ``RANK`` and
    ``WORLD_SIZE`` are not written: the process group takes them as arguments (:func:`init_distributed`)."""
    os.environ.update(LOCAL_RANK=str(world.local_rank), MASTER_ADDR=rendezvous.addr,
                      MASTER_PORT=str(rendezvous.port))


def start_process(timeout_minutes: float, local_rank: int | None = None, lock: OutputDirLock | None = None
                  ) -> tuple[World, torch.device]:
    """Every entry point that runs on ranks starts here: the world and the rendezvous from the launcher's
    environment (or one process), the console, and the process group and device (:func:`init_distributed`).
    With ``lock`` (training), rank 0 claims the output_dir before anything else
    (:meth:`OutputDirLock.claim`), and every rank stops with its refusal as soon as the process group exists:
    a run that may not write there writes nothing."""
    world = world_from_env(local_rank)
    rendezvous = rendezvous_from_env(world)
    setup_console(world.rank)
    publish_launch(world, rendezvous)
    refusal = lock.claim(world) if lock is not None else None
    device = init_distributed(timeout_minutes, world, rendezvous)
    if lock is not None:
        lock.agree(refusal)
    return world, device


def init_distributed(timeout_minutes: float, world: World, rendezvous: Rendezvous) -> torch.device:
    """This rank's device (made current) and the process group (NCCL on GPUs, gloo/ccl on CPU; one rank is a
    group of one) with a bounded collective timeout, formed from ``world`` and ``rendezvous`` as arguments
    (``tcp://``), not from ``os.environ`` (torch's ``env://``): srun and a run without a launcher set no
    ``RANK``. DeepSpeed then adopts the group.

    The timeout bounds every collective, DeepSpeed's included: DeepSpeed builds its data-parallel groups with
    ``torch.distributed.new_group(ranks)`` and no timeout, which torch fills in from its module default (30
    min on gloo, 10 on NCCL), not from the default group's. That default is made ours before any group
    exists. On NCCL the watchdog enforces it (:func:`nccl_error_handling`)."""
    per_venv_extensions()
    device = device_for(world.local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    torch.distributed.distributed_c10d.default_pg_timeout = timeout
    torch.distributed.distributed_c10d.default_pg_nccl_timeout = timeout
    if device.type == "cuda":
        torch.cuda.set_device(device)
        nccl_error_handling()
    if device.type == "cpu":
        build_cpu_comm_op(timeout_minutes * 60)
    backend = deepspeed.get_accelerator().communication_backend_name()
    if not torch.distributed.is_initialized():  # a test may start a process twice
        # device_id binds NCCL's communicators to this rank's GPU at once, as DeepSpeed would; a group of one
        # has no peer to bind with.
        torch.distributed.init_process_group(
            backend, init_method=rendezvous.init_method, rank=world.rank, world_size=world.size,
            timeout=timeout, device_id=device if device.type == "cuda" and world.size > 1 else None)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints "... op built successfully" per rank
        # auto_mpi_discovery off: without RANK in os.environ, DeepSpeed would look for MPI (mpi4py) instead.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                   verbose=False)
    if device.type == "cpu":
        release_cpu_shm_buffer()
    atexit.unregister(destroy_process_group_at_exit)  # once per process, however often a test calls this
    atexit.register(destroy_process_group_at_exit)
    return device


def nccl_error_handling() -> None:
    """What a rank does when a NCCL collective fails or outlasts the timeout, unless the environment says
    otherwise (``docs/cluster.md``). ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: the watchdog thread aborts the
    communicators and ends the process; torch's defaults change between versions (3, no clean-up, in torch
    2.11) and launchers set their own (torchelastic: 1), so it is set explicitly.
    ``TORCH_NCCL_BLOCKING_WAIT`` is left off: it would report a timeout as a Python exception, so that
    ``trainer.train`` names the rank that did not arrive (as it does on gloo), but every ``wait()`` then
    blocks the host until the collective is done, which costs the overlap of communication with the backward
    pass; set it to 1 to trade that for the named rank."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


_collective_failed = False
"""Set by :func:`mark_collective_failure`: the process group is left alone at exit."""


def mark_collective_failure() -> None:
    """A collective failed (a peer died, a timeout): :func:`destroy_process_group_at_exit` must not touch the
    group. Called where such a failure ends the process with ``SystemExit`` (``trainer.train``), which,
    unlike an unhandled exception, leaves ``sys.last_value`` unset."""
    global _collective_failed
    _collective_failed = True


def destroy_process_group_at_exit() -> None:
    """Destroy the process group while Python is still whole. Left to interpreter shutdown, gloo's worker
    threads can abort a rank that finished cleanly ("terminate called without an active exception", exit -6:
    a failed job to SLURM and to the launcher). Skipped after an unhandled exception or a failed collective,
    when a broken NCCL communicator could block its destruction."""
    if _collective_failed or getattr(sys, "last_value", None) is not None:
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_process(exit_code: int) -> NoReturn:
    """End this process with ``exit_code``. Where a process group was started, exit handlers run as usual
    (the group's destruction, wandb's, logging's flush, the reaping of loader workers), and then the process
    ends without the interpreter's shutdown.

    Why: gloo's worker threads live as long as their process group, and DeepSpeed keeps its groups (every
    ZeRO-3 parameter holds one) until the interpreter's final garbage collection. A worker thread that
    finishes a collective frees the tensors it held, and a tensor that Python created (``param.data`` in
    ZeRO-3's gathers) takes the GIL to go. During shutdown, taking the GIL ends the thread, and C++ aborts
    the process ("terminate called without an active exception", exit -6): a rank that finished its run,
    reported failed to the launcher and to SLURM. Seen on the rank that leaves first after a ZeRO-3 export;
    the thread's release lags the collective's end, so no barrier can order it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        sys.exit(exit_code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to save
            stream.flush()
    ctypes.CDLL(None).fflush(None)  # what C and C++ libraries buffered on stdout
    os._exit(exit_code)


def per_venv_extensions() -> None:
    """Keep torch's JIT-built ops (DeepSpeed's) in the virtual environment, unless ``TORCH_EXTENSIONS_DIR``
    is set. torch's default cache (``~/.cache/torch_extensions``) is shared by every checkout of the user:
    one built with another torch or DeepSpeed makes the next launch rebuild (20-40 s), and then the other
    one. Outside a venv, or where it is not writable, torch's default stays."""
    in_venv = sys.prefix != sys.base_prefix
    if "TORCH_EXTENSIONS_DIR" in os.environ or not in_venv or not os.access(sys.prefix, os.W_OK):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def build_cpu_comm_op(timeout_s: float) -> None:
    """Build (or load) DeepSpeed's CPU shared-memory all-reduce op before ``init_distributed`` needs it.

    PyTorch's JIT build guards each op with a plain ``lock`` file that only the builder removes: a first run
    killed mid-build (Ctrl-C, preemption, a time limit) leaves it, and every later run on the machine waits
    for it forever, before any timeout applies. We take a kernel ``flock`` around the build, which dies with
    its holder; whoever holds it knows that no w2v-dist process is building, so a ``lock`` file found then
    was left by a killed build and is removed (with a warning). The wait for the ``flock`` itself is bounded.
    """
    # where the JIT build puts the op
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC2701

    builder = deepspeed.get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    guard = build_dir.parent / f".{builder.name}.w2v-dist.flock"
    if not (build_dir / f"{builder.name}.so").is_file():  # INFO: said by rank 0 only (setup_console)
        log.info("building DeepSpeed's %s op in %s (once per environment, 20-40 s)", builder.name, build_dir)
    deadline = time.monotonic() + timeout_s
    with open(guard, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for another process to finish building "
                                       f"DeepSpeed's {builder.name} op (lock {guard})") from None
                time.sleep(0.2)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a DeepSpeed op build that was killed before it finished; "
                        "rebuilding %s", stale, builder.name)
            stale.unlink(missing_ok=True)
        builder.load(verbose=False)


def release_cpu_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    DeepSpeed's shm comm op (CPU accelerator, all ranks on one host) creates a ~67 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never unlinks it: every
    CPU run leaked them until memory ran out. Each rank maps all the others' buffers during initialisation,
    so after a barrier the names are no longer needed; the mappings live on until the processes exit, even on
    SIGKILL. The address and port are read where the op reads them, from ``os.environ``.
    """
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def check_accelerator(precision: str) -> None:
    """Refuse the classic mistakes before any work: mixed precision asked for on a node where no GPU is
    visible (DeepSpeed would quietly fall back to the CPU), fp16 on the CPU (DeepSpeed's CPU accelerator has
    none: it would fail only after the model is built), or bf16 on a GPU without bf16 (pre-Ampere)."""
    name = deepspeed.get_accelerator().device_name()
    if name == "cpu" and precision != "fp32" and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise RuntimeError(f"deepspeed.precision={precision} but no GPU is visible on {os.uname().nodename} "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                           "check the job's GPU request, or set DS_ACCELERATOR=cpu to train on the CPU on "
                           "purpose")
    if name == "cpu" and precision == "fp16":
        raise RuntimeError("deepspeed.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): "
                           "use bf16 or fp32 on the CPU")
    if name == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"deepspeed.precision=bf16 but {torch.cuda.get_device_name()} has no bf16 "
                           "support: use deepspeed.precision=fp16")


def device_for(local_rank: int) -> torch.device:
    name = deepspeed.get_accelerator().device_name()
    return torch.device(name, local_rank) if name != "cpu" else torch.device("cpu")


def accelerator_name() -> str:
    return deepspeed.get_accelerator().device_name() + f" ({os.environ.get('DS_ACCELERATOR', 'auto')})"
