"""``w2v-dist bench scaling``: 1 vs 2 ranks (weak scaling, same batch per rank), the share of step time spent
in the gradient all-reduce, and a model-based projection to 8 GPUs x N nodes.

The worker half of this file runs under ``deepspeed --num_gpus N`` (gloo on CPU here, NCCL on GPUs).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.corpus import prepare_shards, prepared_model
from benchmarks.output import elapsed, emit

PROJECTION_ASSUMPTIONS = {
    "gradient_bytes_per_param": 2, "base_trainable_params": 90_000_000,
    "nvlink_bus_gb_per_s": 350.0, "infiniband_gb_per_s_per_gpu": 46.0,
    "step_seconds_200s_batch_per_gpu": 0.25, "overlappable_fraction_of_step": 0.6,
}
"""H100 SXM NVLink ring bus bandwidth as NCCL reaches it (~350 of 450 GB/s), one 400 Gb/s NDR NIC per GPU
(~46 GB/s measured), bf16 gradients of wav2vec2-base's trainable parameters, backward ≈ 60% of a step. The
step time is ``bench gpu``'s on an H200 (docs/performance.md): ~0.25 s for 391 s batches, and no shorter for
the recipe's 200 s per GPU, since fixed per-step costs dominate small batches."""


def projection(nodes: int, gpus_per_node: int = 8) -> dict[str, Any]:
    """Ring all-reduce time per step and its share of the step, with and without overlap with backward."""
    a = PROJECTION_ASSUMPTIONS
    world = nodes * gpus_per_node
    volume = 2 * (world - 1) / world * a["base_trainable_params"] * a["gradient_bytes_per_param"]
    bandwidth = a["nvlink_bus_gb_per_s"] if nodes == 1 else a["infiniband_gb_per_s_per_gpu"]
    seconds = volume / (bandwidth * 1e9)
    step = a["step_seconds_200s_batch_per_gpu"]
    exposed = max(0.0, seconds - a["overlappable_fraction_of_step"] * step)
    return {"nodes": nodes, "gpus": world, "allreduce_ms": seconds * 1e3,
            "fraction_unoverlapped": seconds / (step + seconds),
            "fraction_overlapped": exposed / (step + exposed),
            "projected_weak_scaling_efficiency": step / (step + exposed)}


def worker(work_dir: Path, steps: int, batch_seconds: float, out: Path) -> None:
    """Runs on every rank: timed training steps on a fixed per-rank batch, then timed all-reduces of a
    gradient-sized buffer."""
    from benchmarks.step import fixed_batches
    from w2v_dist.config import load_config
    from w2v_dist.dist import all_reduce_sum, all_reduce_tensor
    from w2v_dist.run import build_engine
    from w2v_dist.trainer import train_step

    model_dir = work_dir / "model-tiny"
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "model.mask_time_prob=0",
                             "model.layerdrop=0"])
    world, engine, _ = build_engine(cfg)
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    batch = fixed_batches(work_dir / "loader" / "shards", model_dir, 1, batch_seconds)[0]
    train_step(engine, [batch], world.size)
    step_s = elapsed(lambda _: train_step(engine, [batch], world.size), range(steps)) / steps
    buffer = torch.zeros(trainable, device=engine.device)
    reduce = all_reduce_tensor if world.size > 1 else (lambda tensor: tensor)  # one rank: nothing to reduce
    reduce_s = statistics.median(elapsed(reduce, [buffer]) for _ in range(steps))
    rate = all_reduce_sum([batch.seconds / step_s], engine.device)[0] / world.size
    if world.is_main:
        out.write_text(json.dumps({"ranks": world.size, "step_s": step_s,
                                   "audio_seconds_per_second_per_rank": rate, "allreduce_s": reduce_s,
                                   "trainable_params": trainable, "allreduce_fraction": reduce_s / step_s}))


def scaling_benchmark(work_dir: Path, steps: int, batch_seconds: float) -> dict[str, Any]:
    from w2v_dist.dist import free_port

    prepare_shards(work_dir / "loader", 120, 2)
    prepared_model(work_dir, "tiny")
    results = {}
    for ranks in (1, 2):
        out = work_dir / f"scaling-{ranks}.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")  # one core per rank: weak scaling, no oversubscription
        # This file runs as a script: its checkout's root makes `benchmarks` importable.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks),
                        "--master_port", str(free_port()), __file__, str(work_dir), str(steps),
                        str(batch_seconds), str(out)],
                       check=True, capture_output=True, env=env)
        results[ranks] = emit({"measure": "scaling", **json.loads(out.read_text())})
    efficiency = (results[2]["audio_seconds_per_second_per_rank"]
                  / results[1]["audio_seconds_per_second_per_rank"])
    for nodes in (1, 2, 4, 8):
        emit({"measure": "projection", **projection(nodes)})
    return emit({"measure": "summary", "weak_scaling_efficiency_1_to_2": efficiency,
                 "allreduce_fraction_2_ranks": results[2]["allreduce_fraction"], "cores": os.cpu_count(),
                 "assumptions": PROJECTION_ASSUMPTIONS})


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    worker(Path(args[0]), int(args[1]), float(args[2]), Path(args[3]))
