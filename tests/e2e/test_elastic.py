"""Elastic resume: a run checkpointed by 2 ranks goes on with 1, then 2 again, and ends where the
uninterrupted 2-rank run ends: the same micro-batches in every update, every utterance once per epoch, the
same weights."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCTC

from tests.support.launch import run_deepspeed, run_single
from tests.support.runs import check, metrics, overrides

pytestmark = pytest.mark.slow


def key_log(out: Path) -> dict[int, list[tuple[int, int, tuple[str, ...]]]]:
    """update -> sorted (stream, epoch, keys) over all ranks and launches."""
    updates: dict[int, list[tuple[int, int, tuple[str, ...]]]] = defaultdict(list)
    for path in sorted((out / "keys").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            updates[record["update"]].append((record["stream"], record["epoch"], tuple(record["keys"])))
    return {update: sorted(micro) for update, micro in updates.items()}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_then_one_then_two_end_with_the_straight_runs_weights(shard_dirs: dict, tiny_model: Path,
                                                                        tmp_path: Path, stage: int) -> None:
    # 2 streams of 8 s per update; SpecAugment masks and dropout on: they are drawn per micro-batch.
    # The recipe's randomness (tests/support/runs.py RECIPE) and dropout; schedule.steps: the launches stop
    # at 2, 4 and 6 of the 6-step tri-stage schedule.
    common = {"trainer.update_seconds": 16.0, "deepspeed.zero_stage": stage, "trainer.eval_every": 0,
              "trainer.save_every": 2, "logging.key_log": True, "model.hidden_dropout": 0.1,
              "optim.weight_decay": 0.01, "optim.grad_clip": 0.5, "schedule.steps": 6}
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, straight, **common, **{"trainer.max_steps": 6})]))
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, elastic, **common, **{"trainer.max_steps": 2})]))
    one = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, elastic, **common, **{"trainer.max_steps": 4})])
    check(one)
    assert ("resuming step 2 from 2 rank(s) on 1: grad_accum 1 -> 2, 16 s per update (2 data streams)"
            in one.stderr)
    two = run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, elastic, **common, **{"trainer.max_steps": 6})])
    check(two)
    assert "resuming step 4 from 1 rank(s) on 2: grad_accum 2 -> 1" in two.stderr
    if stage:  # partitioned optimizer state goes through DeepSpeed's universal checkpoint, once per tag
        assert "converting" in one.stderr and "universal" in one.stderr
        assert (elastic / "checkpoints" / "step_00000004" / "universal").is_dir()

    # The same micro-batches in every update, whichever ranks read them.
    expected, seen = key_log(straight), key_log(elastic)
    assert sorted(seen) == list(range(6)) and seen == expected
    per_epoch: dict[int, Counter[str]] = defaultdict(Counter)
    for micro in seen.values():
        for _, epoch, keys in micro:
            per_epoch[epoch].update(keys)
    assert (all(max(counts.values()) == 1
                for counts in per_epoch.values())), "an utterance read twice in an epoch"

    # A continuous loss curve, and the straight run's weights.
    losses = {r["step"]: r["loss"] for r in metrics(elastic) if "loss" in r}
    straight_losses = {r["step"]: r["loss"] for r in metrics(straight) if "loss" in r}
    assert sorted(losses) == list(range(1, 7))
    for step, loss in straight_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    a, b = (load_file(straight / "final" / "model.safetensors"),
            load_file(elastic / "final" / "model.safetensors"))
    initial = load_file(tiny_model / "model.safetensors")
    assert (any(not torch.equal(a[k], initial[k]) for k in a
                if k in initial)), "training did not change the weights"
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    AutoModelForCTC.from_pretrained(elastic / "final")


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_resumed_on_one_rank_follows_the_straight_run(stage: int, shard_dirs: dict, tiny_model: Path,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The base recipe's precision: bf16 keeps fp32 master weights and moments partitioned by rank,
    re-partitioned through the universal checkpoint. bf16 rounding makes the runs differ slightly; a lost or
    misplaced optimizer state moves every weight by a sizeable part of its change (ZeRO-3's group mix-up: ~15
    %)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    common = {"trainer.update_seconds": 16.0, "deepspeed.zero_stage": stage, "deepspeed.precision": "bf16",
              "trainer.eval_every": 0, "trainer.save_every": 2, "optim.weight_decay": 0.01,
              "schedule.steps": 4}
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, straight, **common, **{"trainer.max_steps": 4})]))
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, elastic, **common, **{"trainer.max_steps": 2})]))
    one = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, elastic, **common, **{"trainer.max_steps": 4})])
    check(one)
    assert "universal" in one.stderr
    losses = {r["step"]: r["loss"] for r in metrics(elastic) if "loss" in r}
    for record in (r for r in metrics(straight) if "loss" in r):
        assert losses[record["step"]] == pytest.approx(record["loss"], rel=1e-4), record["step"]
    a, b = (load_file(straight / "final" / "model.safetensors"),
            load_file(elastic / "final" / "model.safetensors"))
    initial = load_file(tiny_model / "model.safetensors")
    for key in a:
        # The key projection's bias has no gradient (softmax ignores a constant per query): Adam turns its
        # rounding noise into full steps, so it follows no run.
        if key in initial and not key.endswith("k_proj.bias") and not torch.equal(a[key], initial[key]):
            moved = (a[key] - initial[key]).norm()
            assert (a[key] - b[key]).norm() < 0.02 * moved, key


def test_a_world_size_that_cannot_share_the_streams_is_refused(shard_dirs: dict, tiny_model: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = overrides(shard_dirs, tiny_model, out, **{"trainer.max_steps": 2, "trainer.eval_every": 0,
                                                     "trainer.update_seconds": 24.0})
    proc = run_deepspeed(["--config", "configs/debug.yaml", *args])
    assert proc.returncode != 0
    assert "3 data streams (micro-batches per update) cannot be shared by 2 ranks" in proc.stderr
