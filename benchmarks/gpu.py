"""``w2v-dist bench gpu``: wav2vec2-base on one GPU, measured against the chip's limit.

wav2vec2-base geometry, randomly initialised (the FLOPs of the real checkpoint), frozen conv encoder, bf16,
ZeRO-2, through our ``Engine`` and ``train_step`` (the real step: global-count normalisation and NaN guard
included). Batches are packed by seconds with our planner from train-clean-100's duration histogram, random
audio and labels at LibriSpeech's 14.6 letters per second. Every variant runs the same batches.

Measures: audio-seconds per second, TFLOP/s and MFU (flops.py documents the FLOPs model; MFU counts the real,
unpadded audio against the datasheet dense bf16 peak and against a measured bf16 matmul), peak memory, host
syncs per step and GPU busy fraction (profiler), graphs compiled during timing, fused vs foreach AdamW, the
data-wait fraction of a real ``train.py`` run, and the largest ``max_batch_seconds`` whose worst case fits.
"""

from __future__ import annotations

import gc
import os
import random
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2Config

from benchmarks.corpus import CHARS_PER_SECOND, librispeech_like_seconds, prepare_shards, prepared_model
from benchmarks.gpu_step import Trial, build_step, measure_variant
from benchmarks.output import SR, elapsed, emit, interleaved_medians
from benchmarks.step import data_wait
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import LABEL_PAD, CTCBatch
from w2v_dist.data.epoch import sorted_batches
from w2v_dist.data.index import Utterance
from w2v_dist.data.plan import BatchPolicy, pack
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.flops import peak_tflops

LONGEST_SECONDS = 35.0


class BenchmarkUnavailable(RuntimeError):
    """What the benchmark needs is not on this machine."""


def planned_batches(batch_seconds: float, count: int, vocab_size: int, seed: int = 0, shape_quantum: int = 0
                    ) -> list[CTCBatch]:
    """``count`` batches packed by padded seconds from a train-clean-100-like stream, on pinned CPU memory;
    with ``shape_quantum``, on the grid of ``data.shape_quantum_frames`` (:mod:`w2v_dist.data.shapes`)."""
    rng = np.random.default_rng(seed)
    utts = [Utterance(0, i, f"u{i}", int(s * SR), int(s * CHARS_PER_SECOND))
            for i, s in enumerate(librispeech_like_seconds(max(4000, int(count * batch_seconds / 12)), rng))]
    policy = BatchPolicy.from_seconds(max_batch_seconds=batch_seconds, sample_rate=SR, max_batch_size=4096,
                                      bucket_window=512, shuffle_buffer=0,
                                      shape_quantum_frames=shape_quantum, geometry=EncoderGeometry())
    grid = policy.grid
    plans = sorted_batches(utts, policy) if grid else \
        [b for start in range(0, len(utts), 512) for b in pack(utts[start:start + 512], policy)]
    random.Random(seed).shuffle(plans)
    return [to_batch(plan, vocab_size, grid) for plan in plans[:count]]


def to_batch(plan: list[Utterance], vocab_size: int, grid: ShapeGrid | None = None) -> CTCBatch:
    rows, width = grid.shape(plan) if grid else (len(plan), max(u.num_samples for u in plan))
    label_width = max(u.label_length for u in plan)
    audio = torch.randn(rows, width)
    audio[len(plan):] = 0.0  # a grid shape's empty rows
    labels = torch.randint(4, vocab_size, (rows, label_width))
    labels[len(plan):] = LABEL_PAD
    for row, utt in enumerate(plan):
        audio[row, utt.num_samples:] = 0.0
        labels[row, utt.label_length:] = LABEL_PAD
    if torch.cuda.is_available():  # as the loader hands them over
        audio, labels = audio.pin_memory(), labels.pin_memory()
    lengths = [u.num_samples for u in plan] + [0] * (rows - len(plan))
    return CTCBatch(input_values=audio, input_lengths=torch.tensor(lengths), labels=labels,
                    keys=tuple(u.key for u in plan), texts=("",) * len(plan),
                    seconds=sum(u.num_samples for u in plan) / SR, normalize=False)


def matmul_tflops() -> float:
    """A large bf16 matmul on random data: the chip's practical ceiling."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(20):
        a @ b
    finish.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (begin.elapsed_time(finish) / 1e3) / 1e12


def adamw_ms(num_params: int, rounds: int = 20) -> dict[str, float]:
    """Fused vs foreach AdamW on a base-sized set of fp32 parameters (the ZeRO master copy), interleaved."""
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (num_params // 4,) * 4]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {"fused": torch.optim.AdamW(params, fused=True),
            "foreach": torch.optim.AdamW(params, foreach=True)}

    def step(opt: torch.optim.Optimizer) -> None:
        opt.step()
        torch.cuda.synchronize()

    medians = interleaved_medians({k: partial(elapsed, step, [o]) for k, o in opts.items()}, rounds - 2,
                                  warmup=2)
    return {f"adamw_{k}_ms": v * 1e3 for k, v in medians.items()}


def largest_batch(model_dir: Path, trial: Trial, start: float, limit: float) -> dict[str, Any]:
    """Grow the worst case (every utterance 35 s) by 1.5x until it runs out of memory; the step is
    discarded."""
    step, config = build_step(model_dir, trial)
    fits, seconds, vocab = 0.0, start, int(config.vocab_size or 0)
    while seconds <= limit:
        count = max(1, int(seconds // LONGEST_SECONDS))
        plan = [Utterance(0, i, f"w{i}", int(LONGEST_SECONDS * SR), int(LONGEST_SECONDS * CHARS_PER_SECOND))
                for i in range(count)]
        try:
            torch.cuda.reset_peak_memory_stats()
            step(to_batch(plan, vocab))
            fits = count * LONGEST_SECONDS
            emit({"measure": "gpu_memory_probe", "batch_seconds": fits,
                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        except torch.OutOfMemoryError:
            break
        seconds *= 1.5
    return {"largest_max_batch_seconds": fits, "probe_limit_seconds": limit,
            "reached_limit": seconds > limit}


def gpu_data_wait(work_dir: Path, model_dir: Path, batch_seconds: float, steps: int) -> dict[str, Any]:
    """A real ``train.py`` run (bf16, ZeRO-2, default loader workers) on LibriSpeech-shaped shards."""
    _, shards = prepare_shards(work_dir / "loader", 800, os.cpu_count() or 2)
    means = data_wait(work_dir / "gpu-run", shards, model_dir, steps, [
        f"data.max_batch_seconds={batch_seconds}", "data.max_batch_size=1024", "deepspeed.precision=bf16",
        "deepspeed.zero_stage=2", "model.layerdrop=0"], ("data_wait_fraction", "audio_seconds_per_second"),
        False)
    return emit({"measure": "gpu_data_wait", "steps": steps, "batch_seconds": batch_seconds, **means})


def trials(quick: bool) -> list[Trial]:
    """The variants timed at the largest batch size. ``quick``: what a default is chosen from, in a few
    minutes (every ``model.pos_conv``, bounded vs free shapes, compile on and off, and the bare loop)."""
    compiled, cudnn = ("model.compile=true",), ("model.cudnn_attention=true",)
    candidates = [Trial("flash", ()), Trial("flash+compile", compiled),
                  *(Trial(f"flash+compile, pos_conv={kernel}", (*compiled, f"model.pos_conv={kernel}"))
                    for kernel in ("fp32", "channels_last", "fft")),
                  Trial("flash, bounded shapes", shape_quantum=16),
                  Trial("flash+compile, bounded shapes", compiled, shape_quantum=16),
                  Trial("bare PyTorch, flash+compile", compiled, bare=True)]
    if quick:
        return candidates
    return [Trial("sdpa (cuDNN)", cudnn), Trial("sdpa (cuDNN), static shapes", cudnn, static_shapes=True),
            Trial("eager", ("model.attention=eager",)), Trial("flash, static shapes", static_shapes=True),
            Trial("flash+compile, ZeRO-0", compiled + ("deepspeed.zero_stage=0",)), *candidates]


def variants_table(results: list[dict[str, Any]], data_wait_fraction: float | None) -> str:
    """One line per variant (audio-s/s, MFU, host syncs, data wait) and the recommended default: the fastest
    of ours (not the bare loop, not a static-shape diagnostic), as the overrides that select it."""
    timed = [r for r in results if "error" not in r]
    wait = "n/a" if data_wait_fraction is None else f"{data_wait_fraction:.3f}"
    lines = [f"{'variant':<40} {'audio-s/s':>10} {'MFU':>6} {'syncs':>6} {'data wait':>9}"]
    for r in timed:
        mfu = r.get("mfu_datasheet")
        lines.append(f"{r['variant'][:40]:<40} {r['audio_seconds_per_second']:>10.0f} "
                     f"{'n/a' if mfu is None else f'{mfu:.1%}':>6} {r['host_syncs_counted']:>6} {wait:>9}")
    lines += [f"{r['variant'][:40]:<40} failed: {r['error'][:60]}" for r in results if "error" in r]
    ours = [r for r in timed if not r["trial"]["bare"] and not r["trial"]["static_shapes"]]
    if ours:
        best = max(ours, key=lambda r: r["audio_seconds_per_second"])
        chosen = [*best["trial"]["overrides"], f"data.shape_quantum_frames={best['trial']['shape_quantum']}"]
        lines.append(f"recommended default: {best['variant']} ({' '.join(chosen)})")
    return "\n".join(lines)


def gpu_benchmark(work_dir: Path, batch_seconds: list[float], steps: int, warmup: int, probe_limit: float,
        quick: bool = False) -> dict[str, Any]:
    """All measurements; ``quick`` times only the candidate variants (no data-wait run, sweep or memory
    probe)."""
    from w2v_dist.process import start_process

    if not torch.cuda.is_available():
        raise BenchmarkUnavailable("bench gpu measures a CUDA GPU and this machine has none "
                                   "(torch.cuda.is_available() is false): run it where `nvidia-smi` lists "
                                   "a GPU, with a CUDA build of torch; `bench step` measures the same step "
                                   "on a CPU")
    start_process(30.0)
    torch._logging.set_logs(recompiles=True)  # a recompilation prints its reason
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepared_model(work_dir, "base")
    device = torch.cuda.get_device_name()
    peaks = {"datasheet": peak_tflops(device), "measured": matmul_tflops()}
    emit({"measure": "gpu_device", "device": device, "torch": torch.__version__,
          "datasheet_bf16_tflops": peaks["datasheet"], "measured_bf16_matmul_tflops": peaks["measured"]})
    skipped = {"skipped": "quick"}
    wait = skipped if quick else attempt("gpu_data_wait",
                                         lambda: gpu_data_wait(work_dir, model_dir, batch_seconds[-1], 40))
    vocab = int(Wav2Vec2Config.from_pretrained(model_dir).vocab_size or 0)
    sweep = [] if quick else [(Trial("flash+compile", ("model.compile=true",)), s)
                              for s in batch_seconds[:-1]]
    results = [attempt("gpu_variant", partial(
                   measure_variant, trial, model_dir,
                   planned_batches(seconds, warmup + steps, vocab, shape_quantum=trial.shape_quantum),
                   warmup, peaks))
               for trial, seconds in sweep + [(trial, batch_seconds[-1]) for trial in trials(quick)]]
    ours = [r for r in results
            if "error" not in r and not r["trial"]["bare"] and not r["trial"]["static_shapes"]]
    best = max(ours, key=lambda r: r["audio_seconds_per_second"])
    bare = next((r for r in results if "error" not in r and r["trial"]["bare"]
                 and r["trial"]["overrides"] == best["trial"]["overrides"]), None)
    overhead: dict[str, Any] = {}
    if bare is not None:
        overhead = emit({"measure": "gpu_engine_overhead", "variant": best["variant"],
                         "bare_audio_seconds_per_second": bare["audio_seconds_per_second"],
                         "engine_audio_seconds_per_second": best["audio_seconds_per_second"],
                         "overhead_ratio": bare["audio_seconds_per_second"]
                         / best["audio_seconds_per_second"]})
    optimizer = skipped if quick else attempt("gpu_adamw", lambda: emit({"measure": "gpu_adamw",
                                                                         **adamw_ms(94_000_000)}))
    memory = skipped if quick else attempt("gpu_memory", lambda: emit({
        "measure": "gpu_memory",
        **largest_batch(model_dir, Trial(**best["trial"]), batch_seconds[-1], probe_limit)}))
    measured_wait = wait.get("data_wait_fraction")
    print(variants_table(results, measured_wait if isinstance(measured_wait, float) else None),
          file=sys.stderr, flush=True)
    return emit({"measure": "summary", "device": device, "best_variant": best["variant"],
                 "batch_seconds": best["batch_seconds"],
                 "audio_seconds_per_second": best["audio_seconds_per_second"],
                 "transformer_mfu": best.get("transformer_mfu_datasheet"), "mfu": best.get("mfu_datasheet"),
                 "peak_memory_gib": best["peak_memory_gib"], "gpu_busy_fraction": best["gpu_busy_fraction"],
                 "host_syncs_per_step": best["host_syncs_per_step"],
                 "engine_overhead_ratio": overhead.get("overhead_ratio"),
                 "data_wait_fraction": wait.get("data_wait_fraction"),
                 "adamw_fused_ms": optimizer.get("adamw_fused_ms"),
                 "adamw_foreach_ms": optimizer.get("adamw_foreach_ms"),
                 "largest_max_batch_seconds": memory.get("largest_max_batch_seconds")})


def attempt(measure: str, trial: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A trial that fails (a compiler missing, out of memory) is reported as a result; the bench goes on."""
    try:
        return trial()
    except Exception as err:
        gc.collect()
        torch.cuda.empty_cache()
        return emit({"measure": measure, "error": repr(err)[:800]})
