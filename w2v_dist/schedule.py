"""Learning-rate schedules as pure functions of the update number (nothing to save: the step is the
state)."""

from __future__ import annotations

import math
from typing import Any

from w2v_dist.config import ScheduleConfig


def lr_at(step: int, peak: float, max_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for update ``step`` (0-based) of ``max_steps``."""
    if cfg.name == "constant":
        return peak
    if cfg.name == "tri_stage":
        warmup, hold = (int(r * max_steps) for r in cfg.phase_ratio[:2])
        decay = max(1, max_steps - warmup - hold)
        if step < warmup:
            return peak * (cfg.init_lr_scale + (1 - cfg.init_lr_scale) * step / warmup)
        if step < warmup + hold:
            return peak
        progress = min(1.0, (step - warmup - hold) / decay)
        return peak * math.exp(math.log(cfg.final_lr_scale) * progress)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    floor = peak * cfg.final_lr_scale
    if cfg.name == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def length_change(saved: dict[str, Any], max_steps: int, cfg: ScheduleConfig, step: int,
                  peak: float) -> str | None:
    """Why a resumed run's learning rate would jump, or ``None``: the schedule spans
    ``schedule.steps or trainer.max_steps`` updates, so extending ``max_steps`` on resume re-stretches it
    under the updates already taken (tri-stage at step 3,000 of 4,000 → 8,000: lr 2.2e-5 → 1e-4, from
    decay back to the peak). ``saved``: the checkpoint's config (a mapping as written by ``to_yaml``)."""
    old = int(saved.get("schedule", {}).get("steps") or saved.get("trainer", {}).get("max_steps") or 0)
    new = cfg.steps or max_steps
    if cfg.name == "constant" or not old or old == new:
        return None
    before, after = lr_at(step, peak, old, cfg), lr_at(step, peak, new, cfg)
    return (f"the learning-rate schedule ({cfg.name}) now spans {new:,} updates instead of the {old:,} this "
            f"run started with: at step {step:,} the lr goes from {before:.2e} to {after:.2e}. To keep the "
            f"old schedule, set schedule.steps={old}")
