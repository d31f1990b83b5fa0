"""Run k updates on fixed batches: rank r of W takes micro-batch r of each global step (W=2, accum 1), or one
rank takes both as accumulated micro-batches (W=1, accum 2). Saves the final weights from rank 0, and the
layers LayerDrop skipped in each update, and each update's grad norm (before clipping) as the engine reports
it, and the host syncs of the last (steady-state) update outside the optimizer's update
(w2v_dist/host_syncs.py).

The recipe's randomness is on (SpecAugment masks, activation dropout, LayerDrop, tri-stage lr); LayerDrop at
0.5 rather than 0.1: the tiny model has 2 layers and the test 3 updates, and it needs updates that skip
layers.

Run as a module from the repository root (``deepspeed --module tests.e2e.equivalence_worker``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

from tests.support.data import eval_stream
from w2v_dist import process
from w2v_dist.config import load_config
from w2v_dist.data.loader import make_loader
from w2v_dist.engine import UpdateOutcome
from w2v_dist.host_syncs import HostSyncCounter
from w2v_dist.run import build_engine
from w2v_dist.schedule import lr_at
from w2v_dist.trainer import train_step

RECIPE = ["model.mask_time_prob=0.3", "model.mask_time_length=2", "model.layerdrop=0.5",
          "model.activation_dropout=0.1", "schedule.name=tri_stage", "optim.lr=1e-3",
          "optim.weight_decay=0.01", "optim.grad_clip=0.5",
          "trainer.seed=4"]  # LayerDrop's draws at this seed: updates with and without skips


def main(out: str, model_dir: str, dev_shards: str, steps: int, stage: int) -> None:
    accum = 2 // process.world_from_env().size
    # ZeRO-3 partitions every parameter (DeepSpeed keeps those under 100k elements whole by default: all of
    # the tiny model's), so each layer's forward gathers and releases.
    cfg = load_config(None, [f"model.name_or_path={model_dir}", *RECIPE, f"trainer.grad_accum={accum}",
                             f"trainer.max_steps={steps}", f"deepspeed.zero_stage={stage}",
                             "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"])
    torch.manual_seed(0)
    world, engine, _ = build_engine(cfg)
    batches = [b for b in make_loader(eval_stream(dev_shards, Path(model_dir), 0, 1), 0, 2) if len(b)]
    assert len(batches) >= 2 * steps, len(batches)
    targets, skipped, grad_norms = [], [], []
    syncs = HostSyncCounter()
    update = engine.update

    def update_uncounted(skip: bool) -> UpdateOutcome:
        with syncs.paused():
            return update(skip)

    engine.update = update_uncounted  # type: ignore[method-assign]
    for step in range(steps):
        pair = [dataclasses.replace(b, update=step, stream=s)
                for s, b in enumerate(batches[2 * step:2 * step + 2])]
        mine = pair if world.size == 1 else [pair[world.rank]]
        targets.append([b.targets for b in pair])
        engine.set_lr(lr_at(step, cfg.optim.lr, steps, cfg.schedule), encoder_frozen=False)
        with syncs if step == steps - 1 else contextlib.nullcontext():
            result = train_step(engine, mine, world.size)
        assert result.cause is None
        skipped.append(sorted(engine.module.layer_drop.skipped))
        grad_norms.append(result.outcome.grad_norm)
    assert any(a != b for a, b in targets), "the test needs uneven target counts across ranks"
    state = engine.full_state_dict()
    if world.is_main:
        torch.save(state, out)
        Path(f"{out}.skipped.json").write_text(json.dumps(skipped))
        Path(f"{out}.grad_norms.json").write_text(json.dumps(grad_norms))
        Path(f"{out}.syncs.json").write_text(json.dumps(syncs.by_op))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], args[2], int(args[3]), int(args[4]))
    # as w2v-dist's entry points end: a ZeRO-3 rank can abort in the interpreter's shutdown
    process.end_process(0)
