"""The DeepSpeed engine: configuration, the guarded optimizer, forward/backward/step, checkpoint I/O.

This is the only module that imports deepspeed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import io
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.tensor_fragment import fragment_address
from transformers import PreTrainedModel

from w2v_dist.config import Config
from w2v_dist.ctc import ctc_loss_sum
from w2v_dist.data.collate import CTCBatch
from w2v_dist.faults import pause_point

log = logging.getLogger("w2v_dist.engine")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_DECAY = ("bias", "layer_norm", "layernorm", "norm.weight", "masked_spec_embed")
LATEST_UNIVERSAL = "latest_universal"
"""What ``ds_to_universal`` writes beside its output folder: the folder's name (we always name it ourselves)."""


CHECKPOINT_CLASSES = (fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum)
"""The only non-tensor classes DeepSpeed's checkpoint files hold (ZeRO 0-3, bf16/fp16/fp32): nothing else is
unpickled on resume."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside :data:`CHECKPOINT_CLASSES`: it is not loaded."""


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, containers and DeepSpeed's few classes, never code."""
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_CLASSES)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds a pickled object that a checkpoint written by w2v-dist never "
            f"contains ({found.group(1) if found else err}). Loading it would run code from whoever could write the "
            "checkpoint directory; use a checkpoint you wrote, or start a new output_dir") from None


def check_checkpoint_files(files: Iterable[Path]) -> None:
    """Refuse checkpoint files any of which would unpickle more than :data:`CHECKPOINT_CLASSES`
    (:class:`UnsafeCheckpointError`, naming the file and the class), before a tool that cannot load safely
    (DeepSpeed's ``zero_to_fp32`` and ``ds_to_universal``) opens them. Runs nothing from the files. A file that
    ``torch.load`` cannot read at all is refused too: what it holds cannot be checked."""
    for path in sorted(files):
        try:
            safe_load(path, map_location="cpu")
        except (OSError, UnsafeCheckpointError):
            raise
        except Exception as err:  # torch reports a file that is no checkpoint in many ways (EOFError, IndexError...)
            raise UnsafeCheckpointError(f"refusing to load {path}: it is not a checkpoint file torch can read "
                                        f"({type(err).__name__}: {err}), so what it holds cannot be checked; "
                                        "remove it, or start a new output_dir") from None


def zero_checkpoint_weights(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO 1-3 checkpoint, its optimizer partitions gathered by DeepSpeed's
    ``zero_to_fp32``, which unpickles with ``weights_only=False``: the files it opens (the tag's top-level
    ``*_model_states.pt`` and ``*_optim_states.pt``; it looks nowhere else) are checked first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_checkpoint_files((root / tag).glob("*.pt"))
    chatter = io.StringIO()  # its prints and shard bars narrate a conversion that either works or raises
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag)


class CheckpointFiles:
    """Wraps DeepSpeed's checkpoint engine: records every file this rank writes (the commit manifest lists
    them) and loads without unpickling code (:func:`safe_load`). Anything else goes to DeepSpeed's engine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[Path] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        self.inner.save(state_dict, path)
        self.written.append(Path(path))

    load = staticmethod(safe_load)


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


def convert_to_universal(tag_dir: Path, target: Path, records: Collection[str] = ()) -> None:
    """DeepSpeed's ``ds_to_universal`` on a tag written by any world size, into a fresh ``target`` (atomically).

    Nothing from an earlier conversion is trusted: ``target`` as found on disk (and the converter's leftovers) is
    deleted first, never loaded. The converter unpickles with ``weights_only=False`` every file it finds under
    ``tag_dir``: it walks sub-directories and picks files by name prefix (``mp_rank_``, ``zero_pp_rank_``...),
    whatever their suffix. So every file under ``tag_dir`` except ``records`` (paths relative to ``tag_dir`` that
    no DeepSpeed tool opens: our JSON records) is checked first with :func:`check_checkpoint_files`. What the
    converter then writes comes from checked files only, which is why DeepSpeed's universal loader, which opens
    ``zero/**.pt`` with ``weights_only=False``, may load ``target`` straight after. A fresh interpreter: the
    converter forks worker pools, which a rank with running threads must not do itself."""
    tmp = target.with_name(f".{target.name}.tmp")
    latest = tmp.parent / LATEST_UNIVERSAL
    for stale in (target, tmp, latest):
        remove(stale)
    check_checkpoint_files(Path(root, name) for root, _, names in os.walk(tag_dir) for name in names
                           if Path(root, name).relative_to(tag_dir).as_posix() not in records)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2",
               "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode != 0:
        raise RuntimeError(f"converting {tag_dir} to DeepSpeed's universal checkpoint failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    latest.unlink(missing_ok=True)  # it names the temp folder, which is about to be renamed
    tmp.replace(target)


def remove(path: Path) -> None:
    """Delete a file, a link or a directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def device_for(local_rank: int) -> torch.device:
    name = deepspeed.get_accelerator().device_name()
    return torch.device(name, local_rank) if name != "cpu" else torch.device("cpu")


def deepspeed_config(cfg: Config, grad_accum: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON, derived from our config; ``deepspeed.extra`` is merged on top.

    Batches are sized by seconds, so DeepSpeed's sample counters are notional: micro-batch 1 per rank.
    ``grad_accum``: micro-batches per update on this world size (default ``trainer.grad_accum``).
    """
    precision = cfg.deepspeed.precision
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum or cfg.trainer.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        # Our guard (trainer.train_step) checks every update for NaN/Inf before it is applied, on all ranks at
        # once; DeepSpeed's own bf16 check would add a per-partition scan and a host sync to every step.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, dict(cfg.deepspeed.extra))


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        base[key] = _deep_merge(dict(base[key]), value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: (head | encoder) × (decay | no decay); norms and biases are never decayed."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = "head" if name.startswith("lm_head") else "encoder"
            decay = param.ndim > 1 and not any(tag in name for tag in NO_DECAY)
            groups.setdefault((part, decay), []).append(param)
    return [{"params": params, "part": part, "weight_decay": weight_decay if decay else 0.0}
            for (part, decay), params in sorted(groups.items())]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that applies nothing on an update the guard marked bad, and counts the updates it applied.

    DeepSpeed (ZeRO 1/2) may also skip on its own when it sees an overflow; comparing ``applied`` before and
    after ``engine.step()`` makes such silent skips visible.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.applied = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.skip_next:
            return None
        self.applied += 1
        return super().step(closure)


@dataclass
class UpdateOutcome:
    applied: bool
    norm: torch.Tensor | float | None
    """The gradient norm before clipping, as the optimizer left it (a device tensor is read only when asked:
    :attr:`grad_norm`, at log steps); ``None`` when the update was not applied."""
    engine_skipped: bool
    """DeepSpeed skipped the update itself (fp16 loss-scale overflow, or a ZeRO overflow check)."""

    @property
    def grad_norm(self) -> float | None:
        """:attr:`norm` as a number: a host read of the device, so the trainer asks only when it logs."""
        return None if self.norm is None else float(self.norm)


class Engine:
    """A DeepSpeed engine around a CTC model (``PreTrainedModel`` or kin) with the NaN/Inf guard's hooks."""

    def __init__(self, cfg: Config, model: PreTrainedModel, device: torch.device, *, grad_accum: int | None = None
                 ) -> None:
        """``device``: what :func:`init_distributed` returned; ``grad_accum``: see :func:`deepspeed_config`."""
        self.cfg = cfg
        self.device = device
        self.optimizer = GuardedAdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=device.type == "cuda")
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.ds_config = deepspeed_config(cfg, grad_accum)
        self.frozen_fp32 = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()
                            if not p.requires_grad} if self.dtype != torch.float32 else {}
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.group_settings = [{k: v for k, v in group.items() if k not in ("params", "lr")}
                               for group in self.optimizer.param_groups]
        """Each AdamW group's own settings (weight decay, part): see :meth:`load`."""
        self.checkpoint_files = CheckpointFiles(self.ds.checkpoint_engine)
        self.ds.checkpoint_engine = self.checkpoint_files
        self.grad_sums: list[torch.Tensor] = []
        if cfg.deepspeed.precision != "fp16":  # under fp16 the loss scaler owns overflow handling
            for param in model.parameters():
                if param.requires_grad:
                    param.register_hook(self._watch_grad)

    def _watch_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # One reduction kernel per gradient: a NaN or Inf anywhere makes its sum non-finite (isfinite().all() took
        # six kernels per parameter). A finite gradient whose sum overflows float32 (entries near 1e32) also counts
        # as bad: such an update is garbage anyway.
        self.grad_sums.append(grad.sum(dtype=torch.float32))
        return grad

    def grad_nonfinite(self) -> torch.Tensor:
        """Whether any gradient since the last update held a NaN or Inf (a device tensor: no host sync)."""
        if not self.grad_sums:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return ~torch.isfinite(torch.stack(self.grad_sums).sum())

    @property
    def module(self) -> PreTrainedModel:
        return self.ds.module

    def forward(self, batch: CTCBatch, with_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed CTC loss (fp32: the model takes log-softmax in fp32) and the logits.

        An empty batch (every sample skipped) gives a zero loss that still reaches every trainable parameter,
        so backward's collectives run on this rank like on the others.
        """
        if not len(batch):
            zero = sum((p.sum() * 0.0 for p in self.module.parameters() if p.requires_grad),
                       torch.zeros((), device=self.device))
            return zero, torch.zeros(0, device=self.device)
        inputs = batch.model_inputs(self.device, with_labels=False)  # the loss is ours: no host sync (ctc.py)
        inputs["input_values"] = inputs["input_values"].to(self.dtype)
        logits = self.ds(**inputs).logits
        loss = ctc_loss_sum(logits, batch, self.module.config) if with_labels else torch.zeros((), device=self.device)
        return loss, logits

    def dummy_forward(self) -> None:
        """A forward on silence, for ranks that ran out of eval batches (keeps ZeRO-3 gathers paired)."""
        self.ds(input_values=torch.zeros(1, 16_000, device=self.device, dtype=self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        pause_point("backward", self.ds.global_rank)  # mid-step: before DeepSpeed's gradient reduction
        self.ds.backward(loss)

    def update(self, skip: bool) -> UpdateOutcome:
        """End of an optimizer update (call after the last micro-batch's backward)."""
        assert self.ds.is_gradient_accumulation_boundary(), "update() must follow the last micro-batch"
        applied_before, skipped_before = self.optimizer.applied, self.ds.skipped_steps
        own_norm = self._unclipped_grad_norm()
        self.optimizer.skip_next = skip
        self.ds.step()
        self.optimizer.skip_next = False
        self.grad_sums.clear()
        if (stale := getattr(self.ds.optimizer, "grad_partitions_flat_buffer", None)) is not None:
            # ZeRO-3 (DeepSpeed 0.19) writes a parameter's gradient partition only when a gradient arrives and never
            # clears it: a layer LayerDrop skips next would get its last gradient applied again.
            stale.zero_()
        applied = self.optimizer.applied > applied_before
        norm = own_norm if own_norm is not None else self.ds.get_global_grad_norm()
        return UpdateOutcome(applied, norm if applied else None,
                             engine_skipped=not skip and (not applied or self.ds.skipped_steps > skipped_before))

    def _unclipped_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm before clipping, where DeepSpeed keeps none: ZeRO-0 without a DeepSpeed
        wrapper (fp32) clips the module's gradients and drops the norm, so metrics.jsonl had ``grad_norm: null``.
        At the update boundary those gradients are already averaged across ranks (DeepSpeed's all-reduce in
        backward), so the local norm is the global one, the same quantity the ZeRO and bf16/fp16 optimizers
        report. ``None`` where DeepSpeed's optimizer computes it itself."""
        if hasattr(self.ds.optimizer, "_global_grad_norm"):
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def micro_step(self) -> None:
        """After a micro-batch that is not the last of its update (DeepSpeed counts the boundary)."""
        assert not self.ds.is_gradient_accumulation_boundary()
        self.ds.step()

    def set_lr(self, lr: float, encoder_frozen: bool) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if encoder_frozen and group.get("part") == "encoder" else lr

    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> list[Path]:
        """Every rank must call this (DeepSpeed#2993: rank-0-only saves hang). Returns the files this rank wrote.

        ``latest`` is not written here: DeepSpeed writes it on rank 0 before its closing barrier, while other
        ranks may still be writing; :class:`w2v_dist.checkpoint.Checkpointer` commits it once all ranks are done.
        """
        self.checkpoint_files.written = []
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
        return list(self.checkpoint_files.written)

    def load(self, directory: Path, tag: str | None = None, universal: bool = False) -> dict[str, Any] | None:
        """Load ``directory/tag``; ``universal``: a tag in DeepSpeed's universal format (:func:`convert_to_universal`),
        whose optimizer state is re-partitioned for this world size."""
        self.ds._config.load_universal_checkpoint = universal  # read by load_checkpoint and the ZeRO optimizers
        try:
            path, client_state = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
        finally:
            self.ds._config.load_universal_checkpoint = False
        # ZeRO-3's universal load (DeepSpeed 0.19) gives every group the settings of group 0 (no weight decay
        # anywhere, the head treated as encoder) and one shared step counter, which AdamW then advances once per
        # group and update (wrong bias correction). Each group gets its own back; the lr is set every step.
        for group, settings in zip(self.optimizer.param_groups, self.group_settings):
            group.update(settings)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return client_state if path is not None else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights for export: trainable ones from the optimiser's fp32 master copy under bf16/fp16,
        frozen ones as they were loaded (the module itself holds only 16-bit copies). ZeRO-3 shards are gathered,
        so every rank must call this; only rank 0's result is complete."""
        module = self.module
        if self.cfg.deepspeed.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict() or {}
        else:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        if self.dtype != torch.float32:
            for name, param in module.named_parameters():
                if param.requires_grad:
                    master = safe_get_full_fp32_param(param)
                    state[name] = (master if master is not None else param).detach().float().cpu()
                else:
                    state[name] = self.frozen_fp32[name]
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()


def accelerator_name() -> str:
    return deepspeed.get_accelerator().device_name() + f" ({os.environ.get('DS_ACCELERATOR', 'auto')})"
