"""``w2v-dist bench step``: the same batches through a bare PyTorch loop and through our DeepSpeed engine.

Both run in one process, interleaved round by round so machine noise hits them alike; the ratio of median
step times is the engine's overhead (guard hooks, DeepSpeed bookkeeping, global-count normalisation).
Then a real training run reports its data-wait fraction with the default loader workers.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from w2v_dist.bench.output import emit
from w2v_dist.data.collate import CTCBatch
from w2v_dist.dist import loader_workers

REPO = Path(__file__).resolve().parents[2]


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: CTCBatch, clip: float) -> None:
    """The seed script's step: forward, mean-per-target loss, backward, clip, AdamW."""
    out = model(**batch.model_inputs("cpu"))
    (out.loss / batch.targets).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fixed_batches(shards: Path, model_dir: Path, count: int, batch_seconds: float) -> list[CTCBatch]:
    import itertools

    from transformers import Wav2Vec2Processor

    from w2v_dist.data.audio import EncoderGeometry
    from w2v_dist.data.index import load_shard_set
    from w2v_dist.data.loader import TrainStream, make_loader, make_preprocess
    from w2v_dist.data.plan import BatchPolicy, StreamLayout

    prep = make_preprocess(Wav2Vec2Processor.from_pretrained(model_dir), EncoderGeometry(), 16_000, 0.5, 35.0)
    stream = TrainStream(load_shard_set(str(shards)), BatchPolicy(int(batch_seconds * 16_000), 64, 256, 256), prep,
                         rank=0, world_size=1, layout=StreamLayout(1, 1, 3))
    return list(itertools.islice(iter(make_loader(stream, 0, 2)), count))


def overhead(work_dir: Path, size: str, batch_seconds: float, rounds: int, steps: int) -> dict[str, Any]:
    from w2v_dist.config import load_config
    from w2v_dist.model import init_model, load_model
    from w2v_dist.run import build_engine
    from w2v_dist.trainer import train_step

    model_dir = work_dir / f"model-{size}"
    if not (model_dir / "config.json").exists():
        init_model(model_dir, size)
    batches = fixed_batches(work_dir / "loader" / "shards", model_dir, steps, batch_seconds)
    torch.set_num_threads(1)  # one core, as each rank gets on a 2-core machine; spinning threads add only noise
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "model.mask_time_prob=0", "model.layerdrop=0",
                             "optim.grad_clip=1.0", "schedule.name=constant"])
    _, engine, processor = build_engine(cfg)
    bare_model = load_model(cfg.model, processor).train()  # the same weights, from the same files
    bare_opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    times: dict[str, list[float]] = {"bare": [], "engine": []}
    for round_number in range(rounds + 1):  # round 0 warms both up and is not counted
        for name in ("bare", "engine"):
            start = time.perf_counter()
            for batch in batches:
                if name == "bare":
                    bare_step(bare_model, bare_opt, batch, cfg.optim.grad_clip)
                else:
                    train_step(engine, [batch], 1)
            if round_number:
                times[name].append((time.perf_counter() - start) / len(batches))
    bare, ours = statistics.median(times["bare"]), statistics.median(times["engine"])
    audio = sum(b.seconds for b in batches) / len(batches)
    return emit({"measure": "step_overhead", "model": size, "batch_seconds": audio, "rounds": rounds,
                 "bare_step_s": bare, "engine_step_s": ours, "overhead_ratio": ours / bare,
                 "bare_audio_seconds_per_second": audio / bare, "engine_audio_seconds_per_second": audio / ours})


def training_windows(out: Path, overrides: list[str], quiet: bool = True) -> list[dict[str, Any]]:
    """Run ``train.py`` in its own process (not in this process's group) and return its ``metrics.jsonl`` log
    windows after the first, which holds the loader workers' start-up."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train.py"), f"output_dir={out}", "trainer.eval_every=0", "trainer.save_every=0",
           "trainer.log_every=5", "checkpoint.resume=false", "logging.progress_bar=false", *overrides]
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this process's group's
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    subprocess.run(cmd, check=True, capture_output=quiet, cwd=REPO, env=env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "data_wait_fraction" in r][1:]


def data_wait(work_dir: Path, steps: int) -> dict[str, Any]:
    """A real (single-process) training run with the default loader workers; its logged data-wait fraction."""
    windows = training_windows(work_dir / "data-wait-run", [
        f"data.train_shards={work_dir}/loader/shards", f"model.name_or_path={work_dir}/model-tiny",
        f"trainer.max_steps={steps}", "data.max_batch_seconds=60", "trainer.preflight=false"])
    return emit({"measure": "data_wait", "steps": steps,
                 "data_wait_fraction": statistics.mean(r["data_wait_fraction"] for r in windows),
                 "workers": loader_workers(-1), "note": "default data.num_workers (-1: one per core, less one); "
                 "windows after the first; CPU step times are long, GPU ones much shorter"})


def step_benchmark(work_dir: Path, size: str, batch_seconds: float, rounds: int, steps: int) -> dict[str, Any]:
    from w2v_dist.bench.loader import prepare_shards

    prepare_shards(work_dir / "loader", 120, 2)
    result = overhead(work_dir, size, batch_seconds, rounds, steps)
    wait = data_wait(work_dir, 40)
    return emit({"measure": "summary", "overhead_ratio": result["overhead_ratio"],
                 "data_wait_fraction": wait["data_wait_fraction"]})
