"""The DeepSpeed engine: configuration, the guarded optimizer, forward/backward/step, checkpoint I/O.

With :mod:`w2v_dist.process` (a rank's start) and :mod:`w2v_dist.checkpoint.files` (DeepSpeed's files), the
only module that imports deepspeed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from transformers import PreTrainedModel

from w2v_dist.checkpoint.files import CheckpointFiles
from w2v_dist.config import Config
from w2v_dist.ctc import ctc_loss_sum
from w2v_dist.data.collate import CTCBatch
from w2v_dist.faults import pause_point

log = logging.getLogger("w2v_dist.engine")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_DECAY = ("bias", "layer_norm", "layernorm", "norm.weight", "masked_spec_embed")


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
        # Our guard (trainer.train_step) checks every update for NaN/Inf before it is applied, on all ranks
        # at once; DeepSpeed's own bf16 check would add a per-partition scan and a host sync to every step.
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

    def __init__(self, cfg: Config, model: PreTrainedModel, device: torch.device, *,
                 grad_accum: int | None = None) -> None:
        """``device``: what :func:`w2v_dist.process.start_process` returned; ``grad_accum``: see
        :func:`deepspeed_config`."""
        self.cfg = cfg
        self.device = device
        self.optimizer = GuardedAdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      fused=device.type == "cuda")
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
        # One reduction kernel per gradient: a NaN or Inf anywhere makes its sum non-finite (isfinite().all()
        # took six kernels per parameter). A finite gradient whose sum overflows float32 (entries near 1e32)
        # also counts as bad: such an update is garbage anyway.
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
        # the loss is ours: no host sync (ctc.py)
        inputs = batch.model_inputs(self.device, with_labels=False)
        inputs["input_values"] = inputs["input_values"].to(self.dtype)
        logits = self.ds(**inputs).logits
        loss = ctc_loss_sum(logits, batch, self.module.config) if with_labels \
            else torch.zeros((), device=self.device)
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
            # ZeRO-3 (DeepSpeed 0.19) writes a parameter's gradient partition only when a gradient arrives
            # and never clears it: a layer LayerDrop skips next would get its last gradient applied again.
            stale.zero_()
        applied = self.optimizer.applied > applied_before
        norm = own_norm if own_norm is not None else self.ds.get_global_grad_norm()
        engine_skipped = not skip and (not applied or self.ds.skipped_steps > skipped_before)
        return UpdateOutcome(applied, norm if applied else None, engine_skipped=engine_skipped)

    def _unclipped_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm before clipping, where DeepSpeed keeps none: ZeRO-0 without a DeepSpeed
        wrapper (fp32) clips the module's gradients and drops the norm, so metrics.jsonl had
        ``grad_norm: null``. At the update boundary those gradients are already averaged across ranks
        (DeepSpeed's all-reduce in backward), so the local norm is the global one, the same quantity the ZeRO
        and bf16/fp16 optimizers report. ``None`` where DeepSpeed's optimizer computes it itself."""
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
        """Every rank must call this (DeepSpeed#2993: rank-0-only saves hang). Returns the files this
        rank wrote.

        ``latest`` is not written here: DeepSpeed writes it on rank 0 before its closing barrier, while
        other ranks may still be writing; :class:`w2v_dist.checkpoint.commit.Checkpointer` commits it once
        all ranks are done.
        """
        self.checkpoint_files.written = []
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
        return list(self.checkpoint_files.written)

    def load(self, directory: Path, tag: str | None = None, universal: bool = False
             ) -> dict[str, Any] | None:
        """Load ``directory/tag``; ``universal``: a tag in DeepSpeed's universal format
        (:func:`w2v_dist.checkpoint.files.convert_to_universal`), whose optimizer state is re-partitioned
        for this world size."""
        # read by load_checkpoint and the ZeRO optimizers
        self.ds._config.load_universal_checkpoint = universal
        try:
            path, client_state = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
        finally:
            self.ds._config.load_universal_checkpoint = False
        # ZeRO-3's universal load (DeepSpeed 0.19) gives every group the settings of group 0 (no weight decay
        # anywhere, the head treated as encoder) and one shared step counter, which AdamW then advances once
        # per group and update (wrong bias correction). Each group gets its own settings back; the lr is
        # set every step.
        for group, settings in zip(self.optimizer.param_groups, self.group_settings):
            group.update(settings)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return client_state if path is not None else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights for export: trainable ones from the optimiser's fp32 master copy under
        bf16/fp16, frozen ones as they were loaded (the module itself holds only 16-bit copies). ZeRO-3
        shards are gathered, so every rank must call this; only rank 0's result is complete."""
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

