"""The README's first command, on 2 CPU ranks: ``configs/base.yaml`` itself, only its paths and sizes
overridden.

bf16, ZeRO-2, compiled layers, SpecAugment time and channel masks, LayerDrop 0.1, tri-stage lr, activation
dropout and the frozen conv encoder are the recipe's. Before LayerDrop was drawn per update, this died at its
first update that skipped a layer: the ranks reduced gradient buckets of different sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.launch import run_deepspeed, run_single
from tests.support.runs import check, metrics
from w2v_dist.config import load_config
from w2v_dist.layerdrop import SharedLayerDrop

pytestmark = pytest.mark.slow


def recipe_args(shard_dirs: dict, model: Path, out: Path, max_steps: int) -> list[str]:
    dev = shard_dirs["dev-clean"]
    return ["--config", "configs/base.yaml", f"output_dir={out}", f"model.name_or_path={model}",
            f"data.train_shards={shard_dirs['train-clean-100']}", f"data.dev_shards.dev-clean={dev}",
            f"data.dev_shards.dev-other={dev}",
            # Sizes for 2 CPU cores, a 2-minute corpus and a model of hidden size 64:
            "data.max_batch_seconds=8", "trainer.update_seconds=16", "data.num_workers=1",
            "model.mask_feature_length=8", "data.min_seconds=0.2", f"trainer.max_steps={max_steps}",
            "trainer.eval_every=6", "trainer.save_every=6", "trainer.log_every=1",
            "logging.progress_bar=false"]


def test_the_base_recipe_trains_on_two_ranks_evaluates_saves_and_resumes_on_one(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "base_100h"
    cfg = load_config("configs/base.yaml", recipe_args(shard_dirs, tiny_model, out, 12)[2:])
    assert (cfg.deepspeed.precision, cfg.deepspeed.zero_stage, cfg.model.compile) == ("bf16", 2, True)
    assert cfg.model.layerdrop == 0.1 and cfg.model.mask_time_prob > 0 and cfg.model.mask_feature_prob > 0
    assert cfg.schedule.name == "tri_stage"
    # The run meets updates that skip a layer (2 layers here, 12 updates, the recipe's seed).
    drop = SharedLayerDrop(torch.nn.ModuleList(torch.nn.Identity() for _ in range(2)), cfg.model.layerdrop)
    assert any(drop.draw(cfg.trainer.seed, update) for update in range(12))

    check(run_deepspeed(recipe_args(shard_dirs, tiny_model, out, 12)))
    records = metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert all(math.isfinite(loss) for loss in losses) and not any(r.get("skipped") for r in records)
    # grid shapes
    assert all(1 <= r["epoch_batch_shapes"] <= r["batch_shapes"] for r in records if "loss" in r)
    evals = [r for r in records if "dev/dev-clean/wer" in r]
    assert [r["step"] for r in evals] == [6, 12] and all("dev/dev-other/wer" in r for r in evals)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000012"
    initial, final = (load_file(tiny_model / "model.safetensors"),
                      load_file(out / "final" / "model.safetensors"))
    assert any(not torch.equal(final[k], initial[k]) for k in final if k in initial)

    resumed = run_single(recipe_args(shard_dirs, tiny_model, out, 14), env={"DS_ACCELERATOR": "cpu"})
    check(resumed)
    assert f"resumed from {out / 'checkpoints' / 'step_00000012'} at step 12 (written by 2 ranks, now 1)" \
        in resumed.stderr
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == [*range(1, 13), 13, 14]
