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
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.corpus import prepare_shards, prepared_model
from benchmarks.output import SR, elapsed, emit, interleaved_medians
from w2v_dist.config import Config
from w2v_dist.ctc import ctc_loss_sum
from w2v_dist.data.collate import CTCBatch
from w2v_dist.dist import loader_workers

REPO = Path(__file__).resolve().parents[1]


class BareLoop:
    """The seed script's step in plain PyTorch, with the engine's numerics: the same CTC loss per global
    target (``w2v_dist/ctc.py``), clipping and AdamW (fused on a GPU), and under bf16 what DeepSpeed's bf16
    optimizer does: bf16 weights and gradients, fp32 master weights that AdamW updates and that are copied
    back. A baseline doing other work (fp32 weights under autocast, transformers' loss with its host reads)
    would flatter or shame the engine for the wrong reasons."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str) -> None:
        self.model, self.device, self.clip = model, device, cfg.optim.grad_clip
        self.dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        model.to(device=device, dtype=self.dtype).train()
        self.trained: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.trained] if self.dtype != torch.float32 \
            else self.trained
        beta1, beta2 = cfg.optim.betas
        self.optimizer = torch.optim.AdamW(self.masters, lr=cfg.optim.lr, betas=(beta1, beta2),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                           fused=device == "cuda")

    def step(self, batch: CTCBatch) -> None:
        inputs = batch.model_inputs(self.device, with_labels=False)
        inputs["input_values"] = inputs["input_values"].to(self.dtype)
        loss = ctc_loss_sum(self.model(**inputs).logits, batch, self.model.config)  # type: ignore[arg-type]
        (loss / max(batch.targets, 1)).backward()
        if self.masters is not self.trained:
            for master, param in zip(self.masters, self.trained):
                master.grad = param.grad.float() if param.grad is not None else None
                param.grad = None
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.masters, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.trained:
            with torch.no_grad():
                torch._foreach_copy_(self.trained, self.masters)


def fixed_batches(shards: Path, model_dir: Path, count: int, batch_seconds: float) -> list[CTCBatch]:
    import itertools

    from transformers import Wav2Vec2Processor

    from w2v_dist.data.audio import EncoderGeometry
    from w2v_dist.data.index import load_shard_set
    from w2v_dist.data.loader import TrainStream, make_loader
    from w2v_dist.data.plan import BatchPolicy, StreamLayout
    from w2v_dist.data.preprocess import make_preprocess

    prep = make_preprocess(Wav2Vec2Processor.from_pretrained(model_dir), EncoderGeometry(), SR, 0.5, 35.0)
    policy = BatchPolicy.from_seconds(max_batch_seconds=batch_seconds, sample_rate=SR, max_batch_size=64,
                                      bucket_window=256, shuffle_buffer=256)
    stream = TrainStream(load_shard_set(str(shards)), policy, prep, rank=0, world_size=1,
                         layout=StreamLayout(1, 1, 3))
    return list(itertools.islice(iter(make_loader(stream, 0, 2)), count))


def overhead(work_dir: Path, size: str, batch_seconds: float, rounds: int, steps: int) -> dict[str, Any]:
    from w2v_dist.config import load_config
    from w2v_dist.model import load_model
    from w2v_dist.run import build_engine
    from w2v_dist.trainer import train_step

    model_dir = prepared_model(work_dir, size)
    batches = fixed_batches(work_dir / "loader" / "shards", model_dir, steps, batch_seconds)
    # One core, as each rank gets on a 2-core machine; spinning threads add only noise.
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "model.mask_time_prob=0",
                             "model.layerdrop=0", "optim.grad_clip=1.0", "schedule.name=constant"])
    _, engine, processor = build_engine(cfg)
    loop = BareLoop(load_model(cfg.model, processor), cfg, "cpu")  # the same weights, from the same files
    bare_run = partial(elapsed, loop.step, batches)
    engine_run = partial(elapsed, lambda batch: train_step(engine, [batch], 1), batches)
    # Round 0 warms up.
    medians = interleaved_medians({"bare": bare_run, "engine": engine_run}, rounds, warmup=1)
    bare, ours = medians["bare"] / len(batches), medians["engine"] / len(batches)
    audio = sum(b.seconds for b in batches) / len(batches)
    return emit({"measure": "step_overhead", "model": size, "batch_seconds": audio, "rounds": rounds,
                 "bare_step_s": bare, "engine_step_s": ours, "overhead_ratio": ours / bare,
                 "bare_audio_seconds_per_second": audio / bare,
                 "engine_audio_seconds_per_second": audio / ours})


def data_wait(out: Path, shards: Path, model_dir: Path, steps: int, overrides: list[str],
              keys: tuple[str, ...] = ("data_wait_fraction",), quiet: bool = True) -> dict[str, float]:
    """Run ``train.py`` in its own process (not in this process's group) and average ``keys`` over its
    ``metrics.jsonl`` log windows after the first, which holds the loader workers' start-up."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train.py"), f"output_dir={out}", f"data.train_shards={shards}",
           f"model.name_or_path={model_dir}", f"trainer.max_steps={steps}", "trainer.eval_every=0",
           "trainer.save_every=0", "trainer.log_every=5", "checkpoint.resume=false",
           "logging.progress_bar=false", *overrides]
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this process's group's
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    # Its output to fd 2: our stdout is the JSON lines.
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.PIPE if quiet else 2,
                   stderr=subprocess.PIPE if quiet else None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "data_wait_fraction" in r][1:]
    return {key: statistics.mean(r[key] for r in windows) for key in keys}


def step_benchmark(work_dir: Path, size: str, batch_seconds: float, rounds: int,
                   steps: int) -> dict[str, Any]:
    _, shards = prepare_shards(work_dir / "loader", 120, 2)
    result = overhead(work_dir, size, batch_seconds, rounds, steps)
    # A real (single-process) training run with the default loader workers; its logged data-wait fraction.
    wait = emit({"measure": "data_wait", "steps": 40, **data_wait(
        work_dir / "data-wait-run", shards, prepared_model(work_dir, "tiny"), 40,
        ["data.max_batch_seconds=60", "trainer.preflight=false"]), "workers": loader_workers(-1),
        "note": "default data.num_workers (-1: one per core, less one); windows after the first; CPU step "
                "times are long, GPU ones much shorter"})
    return emit({"measure": "summary", "overhead_ratio": result["overhead_ratio"],
                 "data_wait_fraction": wait["data_wait_fraction"]})
