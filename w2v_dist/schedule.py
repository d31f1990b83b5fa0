"""Learning-rate schedules as pure functions of the update number (nothing to save: the step is the state)."""

from __future__ import annotations

import math

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
