"""Starting a rank's process: its device, the process group with its timeout and teardown, DeepSpeed's CPU comm op,
and the accelerator checks. Training, ``evaluate`` and the benchmarks all start here."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import io
import logging
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch

log = logging.getLogger("w2v_dist.process")


def init_distributed(timeout_minutes: float, local_rank: int) -> torch.device:
    """The one place that sets up a process: its device (made current), and the process group (NCCL on GPUs,
    gloo/ccl on CPU; one rank is a group of one) with a bounded collective timeout. Training and ``evaluate``
    both start here.

    The timeout bounds every collective, DeepSpeed's included: DeepSpeed builds its data-parallel groups with
    ``torch.distributed.new_group(ranks)`` and no timeout, which torch fills in from its module default (30 min on
    gloo, 10 on NCCL), not from the default group's. That default is made ours before any group exists. On NCCL
    the watchdog enforces it (:func:`nccl_error_handling`)."""
    per_venv_extensions()
    device = device_for(local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    torch.distributed.distributed_c10d.default_pg_timeout = timeout
    torch.distributed.distributed_c10d.default_pg_nccl_timeout = timeout
    if device.type == "cuda":
        torch.cuda.set_device(device)
        nccl_error_handling()
    if device.type == "cpu":
        build_cpu_comm_op(timeout_minutes * 60)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints "... op built successfully" on every rank
        deepspeed.init_distributed(timeout=timeout, verbose=False)
    if device.type == "cpu":
        release_cpu_shm_buffer()
    atexit.unregister(destroy_process_group_at_exit)  # once per process, however often a test calls this
    atexit.register(destroy_process_group_at_exit)
    return device


def nccl_error_handling() -> None:
    """What a rank does when a NCCL collective fails or outlasts the timeout, unless the environment says otherwise
    (``docs/cluster.md``). ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: the watchdog thread aborts the communicators and
    ends the process; torch's defaults change between versions (3, no clean-up, in torch 2.11) and launchers set
    their own (torchelastic: 1), so it is set explicitly. ``TORCH_NCCL_BLOCKING_WAIT`` is left off: it would report a
    timeout as a Python exception, so that ``trainer.train`` names the rank that did not arrive (as it does on
    gloo), but every ``wait()`` then blocks the host until the collective is done, which costs the overlap of
    communication with the backward pass; set it to 1 to trade that for the named rank."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


_collective_failed = False
"""Set by :func:`mark_collective_failure`: the process group is left alone at exit."""


def mark_collective_failure() -> None:
    """A collective failed (a peer died, a timeout): :func:`destroy_process_group_at_exit` must not touch the group.
    Called where such a failure ends the process with ``SystemExit`` (``trainer.train``), which, unlike an
    unhandled exception, leaves ``sys.last_value`` unset."""
    global _collective_failed
    _collective_failed = True


def destroy_process_group_at_exit() -> None:
    """Destroy the process group while Python is still whole. Left to interpreter shutdown, gloo's worker threads
    can abort a rank that finished cleanly ("terminate called without an active exception", exit -6: a failed
    job to SLURM and to the launcher). Skipped after an unhandled exception or a failed collective, when a broken
    NCCL communicator could block its destruction."""
    if _collective_failed or getattr(sys, "last_value", None) is not None:
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def per_venv_extensions() -> None:
    """Keep torch's JIT-built ops (DeepSpeed's) in the virtual environment, unless ``TORCH_EXTENSIONS_DIR`` is set.
    torch's default cache (``~/.cache/torch_extensions``) is shared by every checkout of the user: one built with
    another torch or DeepSpeed makes the next launch rebuild (20-40 s), and then the other one. Outside a venv,
    or where it is not writable, torch's default stays."""
    if "TORCH_EXTENSIONS_DIR" in os.environ or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def build_cpu_comm_op(timeout_s: float) -> None:
    """Build (or load) DeepSpeed's CPU shared-memory all-reduce op before ``init_distributed`` needs it.

    PyTorch's JIT build guards each op with a plain ``lock`` file that only the builder removes: a first run
    killed mid-build (Ctrl-C, preemption, a time limit) leaves it, and every later run on the machine waits for
    it forever, before any timeout applies. We take a kernel ``flock`` around the build, which dies with its
    holder; whoever holds it knows that no w2v-dist process is building, so a ``lock`` file found then was left
    by a killed build and is removed (with a warning). The wait for the ``flock`` itself is bounded.
    """
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC2701 (where the JIT build puts the op)

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
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never unlinks it: every CPU
    run leaked them until memory ran out. Each rank maps all the others' buffers during initialisation, so after
    a barrier the names are no longer needed; the mappings live on until the processes exit, even on SIGKILL.
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
    """Refuse the classic mistakes before any work: mixed precision asked for on a node where no GPU is visible
    (DeepSpeed would quietly fall back to the CPU), fp16 on the CPU (DeepSpeed's CPU accelerator has none: it would
    fail only after the model is built), or bf16 on a GPU without bf16 (pre-Ampere)."""
    name = deepspeed.get_accelerator().device_name()
    if name == "cpu" and precision != "fp32" and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise RuntimeError(f"deepspeed.precision={precision} but no GPU is visible on {os.uname().nodename} "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); check the "
                           "job's GPU request, or set DS_ACCELERATOR=cpu to train on the CPU on purpose")
    if name == "cpu" and precision == "fp16":
        raise RuntimeError("deepspeed.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): use "
                           "bf16 or fp32 on the CPU")
    if name == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"deepspeed.precision=bf16 but {torch.cuda.get_device_name()} has no bf16 support: "
                           "use deepspeed.precision=fp16")


def device_for(local_rank: int) -> torch.device:
    name = deepspeed.get_accelerator().device_name()
    return torch.device(name, local_rank) if name != "cpu" else torch.device("cpu")



def accelerator_name() -> str:
    return deepspeed.get_accelerator().device_name() + f" ({os.environ.get('DS_ACCELERATOR', 'auto')})"
