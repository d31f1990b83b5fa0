"""End-to-end training on a tiny random model: 2 DeepSpeed ranks on CPU, the guard, resume, debug mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.launch import run_deepspeed, run_single
from tests.support.runs import check, metrics, overrides, wandb_artifacts
from w2v_dist.data.index import load_shard_set

pytestmark = pytest.mark.slow


def test_two_rank_deepspeed_run_exports_a_loadable_model(shard_dirs: dict, tiny_model: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_API_KEY", "sekret-0123456789abcdef")
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = run_deepspeed(["--config", "configs/demo.yaml", *overrides(
        shard_dirs, tiny_model, out,
        **{"logging.wandb.mode": "offline", "logging.wandb.log_checkpoints": True})])
    check(proc)
    leaked = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before
    assert not leaked, f"DeepSpeed's CPU all-reduce buffers were left in /dev/shm: {leaked}"
    records = metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # no peak on CPU
    assert all(r["tflops_per_second"] > 0 and "mfu" not in r for r in records if "loss" in r)
    evals = [r for r in records if "dev/dev-clean/wer" in r]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["dev/dev-clean/utterances"] == 12
    assert ((out / "config.yaml").is_file()
            and (out / "checkpoints" / "latest").read_text() == "step_00000006")
    assert (out / "final" / "model.safetensors").is_file()
    # A quiet console: expected library noise is gone, the load is summarised once, by rank 0.
    for noise in ("LOAD REPORT", "No CUDA runtime", "untested optimizer", "built successfully",
                  "Loading weights"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert proc.stderr.count("w2v_dist.model] loaded ") == 1 and "rank1 w2v_dist" not in proc.stderr

    from transformers import Wav2Vec2ForCTC, pipeline

    model = Wav2Vec2ForCTC.from_pretrained(out / "final")
    assert model.config.vocab_size == 32
    asr = pipeline("automatic-speech-recognition", model=str(out / "final"), device="cpu")
    assert isinstance(asr({"raw": torch.zeros(16_000).numpy(), "sampling_rate": 16_000})["text"], str)

    secret_hits = [p for p in out.rglob("*") if p.is_file() and b"sekret-0123456789abcdef" in p.read_bytes()]
    assert not secret_hits, f"the API key leaked into {secret_hits}"
    assert any((out / "wandb").glob("offline-run-*")), "wandb offline run was not written on rank 0"
    # Every committed checkpoint and export is a wandb artifact referencing it in place, with its step and
    # WER.
    run_id = (out / "wandb_run_id").read_text()
    artifacts = wandb_artifacts(out)
    checkpoints = [a for a in artifacts if a["type"] == "checkpoint"]
    assert [(a["name"], sorted(a["aliases"]), a["metadata"]["step"]) for a in checkpoints] == [
        (f"checkpoint-{run_id}", ["latest", f"step-{step}"], step) for step in (3, 6)]
    for art in checkpoints:
        tag = out.resolve() / "checkpoints" / f"step_{art['metadata']['step']:08d}"
        assert art["refs"] and all(ref.startswith(tag.as_uri() + "/") for ref in art["refs"]), art["refs"]
        assert {Path(ref).name for ref in art["refs"]} >= {"world.json", "rng_rank0.pt", "rng_rank1.pt"}
        assert art["metadata"]["dev_wer"] == evals[art["metadata"]["step"] // 3 - 1]["dev/dev-clean/wer"]
    models = [a for a in artifacts if a["type"] == "model"]
    # wandb adds "latest" itself
    assert "best" in models[0]["aliases"] and models[0]["metadata"]["step"] == 3
    assert "final" in models[-1]["aliases"] and models[-1]["metadata"] == {
        "step": 6, "dev_wer": evals[-1]["dev/dev-clean/wer"], "path": str(out / "final")}
    assert f"{(out / 'final').resolve().as_uri()}/model.safetensors" in models[-1]["refs"]


def test_nan_and_inf_on_one_rank_skip_the_update_on_all_ranks(shard_dirs: dict, tiny_model: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_deepspeed(["--config", "configs/demo.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"trainer.inject.nan_loss_at_steps": "[3]", "data.max_seconds": 1.6,
                                        "trainer.inject.inf_grad_at_steps": "[4]",
                                        "trainer.inject.rank": 1})])
    check(proc)
    # The save due at step 3 waits for an applied update: step 5 (keep_last 2).
    assert "step 3: checkpoint not saved: the last 1 update(s) were skipped" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000006"]
    last = [r for r in metrics(out) if "loss" in r][-1]
    assert last["skipped"] == {"loss_nonfinite": 1, "grad_nonfinite": 1}
    index = json.loads((shard_dirs["train-clean-100"] / "index.json").read_text())
    too_long = sum(1 for s in index["shards"] for _, n, *_ in s["utterances"] if n > 1.6 * 16_000)
    first = [r for r in metrics(out) if "loss" in r][0]
    # every slot reports its epoch-0 filter counts with its first batch: pooled over ranks they cover the
    # index
    assert 0 < too_long <= first["loader_skips"]["too_long"], (too_long, first["loader_skips"])
    bad = [json.loads(line) for line in (out / "bad_batches.jsonl").read_text().splitlines()]
    assert [(b["step"], b["cause"]) for b in bad] == [(3, "loss_nonfinite"), (4, "grad_nonfinite")]
    assert all(len(b["keys_by_rank"]) == 2 and all(b["keys_by_rank"]) for b in bad)
    weights = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_bad_updates_stop_the_run_with_a_clear_message(shard_dirs: dict, tiny_model: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"trainer.inject.nan_loss_at_steps": "[2,3,4]",
                                        "trainer.max_consecutive_bad_steps": 3, "data.num_workers": 0})])
    assert proc.returncode != 0
    assert "3 consecutive updates had non-finite losses or gradients" in proc.stderr
    assert not (out / "final").exists()


def test_resume_continues_to_identical_weights(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """Debug mode (one process, no launcher): 8 steps straight == 4 steps, stop, rerun the same command."""
    # schedule.steps: the interrupted run's first launch stops at 4 on the 8-step schedule.
    common = {"data.num_workers": 0, "trainer.eval_every": 0, "trainer.save_every": 0,
              "model.hidden_dropout": 0.1, "schedule.steps": 8}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    check(run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, straight,
                                                                   **common, **{"trainer.max_steps": 8})]))
    wandb = {"logging.wandb.mode": "offline"}
    check(run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, interrupted,
                                                                   **common, **wandb,
                                                                   **{"trainer.max_steps": 4})]))
    resumed = run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, interrupted,
                                                                       **common, **wandb,
                                                                       **{"trainer.max_steps": 8})])
    check(resumed)
    assert "resumed from" in resumed.stderr
    # One wandb run across the restart: both launches wrote to the run whose id output_dir keeps.
    run_id = (interrupted / "wandb_run_id").read_text()
    launches = sorted((interrupted / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and all(p.name.endswith(f"-{run_id}") for p in launches), launches
    a, b = (load_file(straight / "final" / "model.safetensors"),
            load_file(interrupted / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses_a = [r["loss"] for r in metrics(straight) if "loss" in r]
    losses_b = [r["loss"] for r in metrics(interrupted) if "loss" in r]
    assert losses_a == losses_b


def test_tiny_model_overfits_a_few_utterances(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"data.max_train_samples": 4, "data.num_workers": 0, "optim.lr": 3e-3,
                                        "trainer.max_steps": 120, "trainer.eval_every": 0,
                                        "trainer.save_every": 0, "model.freeze_feature_encoder": True})])
    check(proc)
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_torchrun_launch_with_two_cpu_ranks(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    import subprocess

    from tests.support.launch import REPO

    proc = subprocess.run(["launch/local.sh", "torchrun", "2", "configs/demo.yaml",
                           *overrides(shard_dirs, tiny_model, out, **{"trainer.max_steps": 3,
                                                                      "trainer.eval_every": 3,
                                                                      "trainer.save_every": 0})],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    check(proc)
    assert "world: 2 rank(s)" in proc.stderr
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert (out / "final" / "model.safetensors").is_file()


def test_two_ranks_on_every_zero_stage_equal_one_rank_accumulating_the_same_batches(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """Loss normalised by global target count, and randomness (masks, dropout, LayerDrop) drawn per update
    and stream: 2 ranks x 1 micro-batch under ZeRO 0, 2 and partitioned 3 == 1 rank x 2 micro-batches (fp32).
    The grad norm each reports (DeepSpeed's own on ZeRO 2 and 3, ours on ZeRO 0, where DeepSpeed keeps none)
    is the same finite number: the global norm before clipping (optim.grad_clip=0.5 clips these updates).
    Each run's last update reads the device once outside the optimizer's update: the step's one read of its
    flags and counts."""
    import json

    args = [str(tiny_model), str(shard_dirs["train-clean-100"]), "3"]
    runs = {"one": (1, 0), "zero0": (2, 0), "zero2": (2, 2), "zero3": (2, 3)}
    for name, (ranks, stage) in runs.items():
        check(run_deepspeed([str(tmp_path / name), *args, str(stage)], ranks=ranks,
                            program=("--module", "tests.e2e.equivalence_worker")))
    skipped = {name: json.loads((tmp_path / f"{name}.skipped.json").read_text()) for name in runs}
    assert all(s == skipped["one"] for s in skipped.values()), skipped
    assert (any(skipped["one"])
            and not all(skipped["one"])), f"no update with and one without a skip: {skipped}"
    syncs = {name: json.loads((tmp_path / f"{name}.syncs.json").read_text()) for name in runs}
    assert (all(sum(counted.values()) <= 1
                for counted in syncs.values())), f"host syncs outside the optimizer: {syncs}"
    norms = {name: json.loads((tmp_path / f"{name}.grad_norms.json").read_text()) for name in runs}
    assert all(isinstance(n, float) and math.isfinite(n) and n > 0.5 for n in norms["zero0"]), norms
    for name in runs:
        assert norms[name] == pytest.approx(norms["zero2"], rel=1e-4), norms
    one = torch.load(tmp_path / "one", weights_only=True)
    initial = load_file(tiny_model / "model.safetensors")
    moved = [k for k in one if k in initial and not torch.equal(one[k], initial[k])]
    assert moved, "training did not change the weights"
    for name in ("zero0", "zero2", "zero3"):
        two = torch.load(tmp_path / name, weights_only=True)
        for key in one:
            assert torch.allclose(one[key], two[key], rtol=1e-5, atol=1e-6), (name, key)


def test_rollback_returns_to_the_last_checkpoint_then_gives_up(shard_dirs: dict, tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """A checkpoint due at every step: none is committed inside the streak (step 5), so the rollback lands on
    the last one from before it."""
    out = tmp_path / "run"
    proc = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"trainer.inject.nan_loss_at_steps": "[5,6]", "trainer.max_steps": 10,
                                        "trainer.max_consecutive_bad_steps": 2,
                                        "trainer.on_divergence": "rollback", "trainer.max_rollbacks": 1,
                                        "trainer.save_every": 1, "trainer.eval_every": 0,
                                        "data.num_workers": 0})])
    assert proc.returncode != 0
    assert ("step 5: checkpoint not saved: the last 1 update(s) were skipped; latest still names "
            "step_00000004" in proc.stderr)
    assert "rolled back from step 6 to the checkpoint at step 4 (rollback 1 of 1)" in proc.stderr
    assert "2 consecutive updates had non-finite" in proc.stderr
    assert [r["rollback_from"] for r in metrics(out) if "rollback_from" in r] == [6]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"


def test_a_diverged_run_commits_no_checkpoint_and_exports_nothing(shard_dirs: dict, tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    """``optim.lr=1000`` with a checkpoint due at every step. The first update blows the weights up (finite,
    but every later loss is NaN); the run ends before ``max_consecutive_bad_steps``. The feature encoder
    trains, as in configs/demo.yaml: frozen, the weights stay small enough for finite logits."""
    out = tmp_path / "run"
    proc = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"optim.lr": 1000, "model.freeze_feature_encoder": False,
                                        "trainer.max_steps": 4, "trainer.save_every": 1,
                                        "trainer.eval_every": 0, "data.num_workers": 0})])
    assert proc.returncode != 0
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and math.isfinite(train[0]["loss"])
    assert all(r["loss"] is None and r["skipped_cause"] for r in train[1:]), train  # not 0.0
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert ("step 2: checkpoint not saved: the last 1 update(s) were skipped; latest still names "
            "step_00000001" in proc.stderr)
    assert ("of its logits on a probe batch (a second of silence and one of noise) are NaN or Inf"
            in proc.stderr)
    assert f"{out / 'final'} was not exported" in proc.stderr
    assert not (out / "final").exists() and not (out / "best").exists()
    assert metrics(out)[-1]["final"]["exported"] is False


def test_resume_with_another_model_is_refused_before_anything_is_written(shard_dirs: dict, tiny_model: Path,
                                                                         tmp_path: Path) -> None:
    """Another model of the same family and shapes (another seed): DeepSpeed would load it without a word,
    and the model card would name it as the base model."""
    from w2v_dist.model import init_model

    out, other = tmp_path / "run", init_model(tmp_path / "other", "tiny", seed=1)
    common = {"trainer.eval_every": 0, "trainer.save_every": 2, "data.num_workers": 0, "schedule.steps": 4}
    check(run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, out, **common,
                                                                   **{"trainer.max_steps": 2})]))
    before = {name: (out / name).read_bytes()
              for name in ("config.yaml", "metrics.jsonl", "checkpoints/latest")}
    proc = run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, other, out, **common,
                                                                    **{"trainer.max_steps": 4})])
    assert proc.returncode != 0
    assert f"it holds {tiny_model} (wav2vec2, architecture " in proc.stderr
    assert f"but this run's model is {other} (wav2vec2, architecture " in proc.stderr
    assert "they differ in name_or_path." in proc.stderr and "Traceback" not in proc.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_best_export_and_checkpoint_scores(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    check(run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"trainer.max_steps": 6, "trainer.eval_every": 2,
                                        "trainer.save_every": 2, "checkpoint.keep_last": 1,
                                        "checkpoint.keep_best": 1, "data.num_workers": 0})]))
    scores = json.loads((out / "checkpoints" / "scores.json").read_text())
    assert sorted(scores) == ["step_00000002", "step_00000004", "step_00000006"]
    best = min(scores, key=lambda t: (scores[t], t))
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == sorted({best, "step_00000006"})
    assert (out / "best" / "model.safetensors").is_file() and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_export_keeps_fp32_weights(shard_dirs: dict, tiny_model: Path, tmp_path: Path,
                                             stage: int) -> None:
    """bf16 training keeps 16-bit module copies; the export must carry the fp32 master and the untouched
    frozen encoder, not bf16-rounded weights."""
    out = tmp_path / "run"
    check(run_deepspeed(["--config", "configs/demo.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"deepspeed.precision": "bf16", "deepspeed.zero_stage": stage,
                                        "trainer.max_steps": 3, "trainer.eval_every": 3,
                                        "trainer.save_every": 3, "model.freeze_feature_encoder": True})]))
    initial, final = (load_file(tiny_model / "model.safetensors"),
                      load_file(out / "final" / "model.safetensors"))
    frozen = [k for k in initial if k.startswith("wav2vec2.feature_extractor.")]
    assert frozen and all(torch.equal(initial[k], final[k]) for k in frozen)
    head = final["lm_head.weight"]
    assert not torch.equal(head, initial["lm_head.weight"]), "the head should have trained"
    assert (not torch.equal(head,
                            head.bfloat16().float())), "exported head is bf16-rounded, not the fp32 master"
    from transformers import Wav2Vec2ForCTC

    assert Wav2Vec2ForCTC.from_pretrained(out / "final").dtype == torch.float32


def test_sigkill_of_one_rank_fails_fast_and_relaunch_resumes(shard_dirs: dict, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    import signal
    import time

    from tests.support.launch import Job, Local

    out = tmp_path / "run"
    args = overrides(shard_dirs, tiny_model, out, **{"trainer.max_steps": 60, "trainer.save_every": 5,
                                                    "trainer.eval_every": 0,
                                                     "trainer.collective_timeout_minutes": 1})
    job = Job(Local(), ["--config", "configs/demo.yaml", *args], tmp_path / "logs")
    job.wait_for((out / "checkpoints" / "latest").exists, "the first checkpoint", timeout=300)
    time.sleep(1.0)
    killed_at = time.time()
    job.signal(signal.SIGKILL, "rank1")
    codes = job.finish(timeout=180)
    output = job.output()
    assert codes != [0]
    assert time.time() - killed_at < 120, "the surviving rank must not hang"
    assert ("exits with return code = -9" in output
            or "Another rank has most likely died" in output), output[-3000:]
    saved = (out / "checkpoints" / "latest").read_text()
    relaunch = run_deepspeed(["--config", "configs/demo.yaml", *args])
    check(relaunch)
    assert f"resumed from {out / 'checkpoints' / saved}" in relaunch.stderr
    assert [r for r in metrics(out) if "final" in r][-1]["final"]["step"] == 60


def test_two_ranks_two_workers_over_three_uneven_shards_finish(corpus: Path, tiny_model: Path,
                                                               shard_dirs: dict, tmp_path: Path) -> None:
    """4 data slots over 3 shards of different sizes: naive shard splitting would leave a slot empty and
    hang."""
    from w2v_dist.prep.shards import ShardOptions, shard_corpus
    from w2v_dist.prep.sources import librispeech_sources

    sources = librispeech_sources(corpus, ["train-clean-100"])
    total_mb = sum(s.audio.stat().st_size for s in sources) / 1e6
    index = shard_corpus(sources, tmp_path / "three", ShardOptions(shard_size_mb=total_mb * 0.45, workers=2),
                         {})
    assert index["totals"]["shards"] == 3
    assert len({s["samples"] for s in index["shards"]}) > 1
    out = tmp_path / "run"
    dirs = {**shard_dirs, "train-clean-100": tmp_path / "three"}
    check(run_deepspeed(["--config", "configs/demo.yaml", *overrides(
        dirs, tiny_model, out, **{"data.num_workers": 2, "trainer.max_steps": 30, "trainer.eval_every": 0,
                                  "trainer.save_every": 0, "trainer.log_every": 10})]))
    last = [r for r in metrics(out) if "loss" in r][-1]
    assert last["step"] == 30 and last["epoch"] > 1.0


def test_freeze_finetune_updates_trains_only_the_head_at_first(shard_dirs: dict, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    check(run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"model.freeze_finetune_updates": 3, "trainer.max_steps": 3,
                                        "trainer.eval_every": 0, "data.num_workers": 0})]))
    initial, final = (load_file(tiny_model / "model.safetensors"),
                      load_file(out / "final" / "model.safetensors"))
    encoder = [k for k in initial if k.startswith("wav2vec2.encoder.")]
    assert encoder and all(torch.equal(initial[k], final[k]) for k in encoder)
    assert not torch.equal(initial["lm_head.weight"], final["lm_head.weight"])


def test_mixed_precision_without_a_visible_gpu_is_a_clear_startup_error(shard_dirs: dict, tiny_model: Path,
                                                                         tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = run_single(["--config", "configs/debug.yaml",
                       *overrides(shard_dirs, tiny_model, tmp_path / "run",
                                  **{"deepspeed.precision": "bf16"})],
                      env={"CUDA_VISIBLE_DEVICES": ""}, base_env=env)
    assert (proc.returncode != 0 and "but no GPU is visible" in proc.stderr
            and "DS_ACCELERATOR=cpu" in proc.stderr)


def test_speed_perturbation_trains(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    check(run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"data.speed_perturb": "[0.9,1.0,1.1]", "trainer.max_steps": 3,
                                        "trainer.eval_every": 0, "trainer.save_every": 0})]))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


def test_a_mix_of_two_shard_sets_trains_counts_each_and_resumes_exactly(shard_dirs: dict, tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    """``data.train_mix``: a quarter of one set and all of another per epoch; metrics.jsonl counts the
    utterances of each; 6 steps straight == 3 steps, stop, rerun (the per-epoch subsets are part of the exact
    resume)."""
    train, second = str(shard_dirs["train-clean-100"]), str(shard_dirs["dev-clean"])
    # schedule.steps: the interrupted run's launches stop before the 6-step schedule ends.
    common = {"schedule.steps": 6, "data.train_shards": "''",
              "data.train_mix": f"{{{train}: 0.25, {second}: 1.0}}", "data.num_workers": 0,
              "trainer.eval_every": 0, "trainer.save_every": 0}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    check(run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, straight,
                                                                   **common, **{"trainer.max_steps": 6})]))
    for steps in (3, 6):
        check(run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, interrupted,
                                                                       **common,
                                                                       **{"trainer.max_steps": steps})]))
    a, b = (load_file(straight / "final" / "model.safetensors"),
            load_file(interrupted / "final" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = [r for r in metrics(straight) if "loss" in r]
    assert [r["loss"] for r in records] == [r["loss"] for r in metrics(interrupted) if "loss" in r]
    counts = records[-1]["utterances_by_set"]
    assert set(counts) == {train, second} and all(n > 0 for n in counts.values()), counts
    assert counts == [r for r in metrics(interrupted) if "loss" in r][-1]["utterances_by_set"]
    per_epoch = round(load_shard_set(train).total_samples * 0.25) + load_shard_set(second).total_samples
    assert records[-1]["epoch"] == pytest.approx(sum(counts.values()) / per_epoch, rel=0.15)
