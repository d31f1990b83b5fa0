"""One variant of the train step on a GPU, timed: throughput, FLOPs, memory, host syncs, kernel time.

Used by ``w2v-dist bench gpu`` (gpu.py); the FLOPs model is in flops.py.
"""

from __future__ import annotations

import gc
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.output import SR, elapsed, emit
from w2v_dist.data.collate import CTCBatch
from w2v_dist.flops import batch_flops
from w2v_dist.host_syncs import HostSyncCounter

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
"""On a machine without a GPU everything still runs (CI exercises this module on the CPU); memory, syncs and
kernel times then read as zero."""


@dataclass(frozen=True)
class Trial:
    name: str
    overrides: tuple[str, ...] = ()
    """Config overrides (``model.attention=eager``, ``model.compile=true``,
    ``deepspeed.zero_stage=0``...)."""
    static_shapes: bool = False
    """Diagnostic: repeat one batch, so nothing depends on a new shape."""
    bare: bool = False
    """A bare PyTorch loop with the engine's numerics (:class:`~benchmarks.step.BareLoop`) instead of our
    engine and train_step."""
    shape_quantum: int = 0
    """Pad the batches to the grid of ``data.shape_quantum_frames`` (0: each to its longest utterance)."""


def build_step(model_dir: Path, trial: Trial) -> tuple[Callable[[CTCBatch], object], Any]:
    """The step function a trial times; each call returns when the GPU has finished the step."""
    from benchmarks.step import BareLoop
    from w2v_dist.config import load_config
    from w2v_dist.model import load_model, load_processor
    from w2v_dist.run import build_engine
    from w2v_dist.trainer import train_step

    cfg = load_config(None, [f"model.name_or_path={model_dir}", "deepspeed.precision=bf16",
                             "deepspeed.zero_stage=2", "model.layerdrop=0", "schedule.name=constant",
                             *trial.overrides])
    if not trial.bare:
        _, engine, _ = build_engine(cfg)
        # train_step ends in a host read of the guard flags: the step is complete
        return lambda batch: train_step(engine, [batch], 1), engine.module.config
    bare = BareLoop(load_model(cfg.model, load_processor(cfg.model, None)), cfg, DEVICE)

    def step(batch: CTCBatch) -> None:
        bare.step(batch)
        if CUDA:
            torch.cuda.synchronize()

    return step, bare.model.config


def measure_variant(trial: Trial, model_dir: Path, batches: list[CTCBatch], warmup: int,
                    peaks: dict[str, float | None]) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    if trial.static_shapes:
        batches = [batches[0]] * len(batches)
    step, config = build_step(model_dir, trial)
    warmup_s = elapsed(step, batches[:warmup])
    graphs_before = counters["stats"]["unique_graphs"]
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    measured = batches[warmup:]
    step_times = [elapsed(step, [batch]) for batch in measured]
    anatomy = step_anatomy(step, measured[:3])
    seconds = sum(b.seconds for b in measured)
    wall = sum(step_times)
    flops = batch_flops(config, [n for b in measured for n in b.sample_lengths if n])  # real rows only
    record = {"measure": "gpu_variant", "variant": trial.name, "trial": asdict(trial),
              "batch_seconds": statistics.mean(b.input_values.numel() / SR for b in measured),
              "steps": len(measured), "step_s_median": statistics.median(step_times),
              "audio_seconds_per_second": seconds / wall, "tflops": flops.total / wall / 1e12,
              "transformer_tflops": flops.transformer / wall / 1e12, "warmup_s": warmup_s,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
              "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - graphs_before}
    for label, peak in peaks.items():
        if peak:
            record[f"mfu_{label}"] = flops.total / wall / 1e12 / peak
            record[f"transformer_mfu_{label}"] = flops.transformer / wall / 1e12 / peak
    record.update(anatomy)
    del step
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without a GPU
    return emit(record)


def step_anatomy(step: Callable[[CTCBatch], object], batches: list[CTCBatch]) -> dict[str, Any]:
    """Host syncs per step (CUDA's sync debug mode, and :class:`HostSyncCounter`), the fraction of wall time
    the GPU runs kernels, and where the GPU and the host spend a step."""
    from torch.profiler import ProfilerActivity, profile

    if CUDA:
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(batches[0])
    if CUDA:
        torch.cuda.set_sync_debug_mode(0)
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    # The same reads, counted by operator, on any device (the optimizer's included).
    with HostSyncCounter() as counted:
        step(batches[-1])
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        wall_us = elapsed(step, batches) * 1e6  # each step returns when the GPU has finished it
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, end = 0.0, float("-inf")
    # The union of the kernels' intervals.
    for lo, hi in sorted((e.time_range.start, e.time_range.end) for e in kernels):
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:80]] = by_name.get(e.name[:80], 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda item: -item[1])[:8]
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {"host_syncs_per_step": sum("synchroniz" in str(w.message) for w in caught),
            "host_sync_sites": sites,
            "host_syncs_counted": counted.total, "host_syncs_counted_by_op": dict(counted.by_op),
            "top_kernels_ms_per_step": {name: round(us / 1e3 / len(batches), 3) for name, us in top},
            "top_host_ops_ms_per_step": {e.key[:60]: round(e.self_cpu_time_total / 1e3 / len(batches), 3)
                                         for e in host},
            "gpu_busy_fraction": busy / wall_us}
