"""The SLURM launch scripts on a real one-node SLURM (``tests.support.slurm``): 2 CPU ranks through srun,
sharding as a job array, 2-rank evaluation. Preemption with SIGUSR1 -> checkpoint -> REQUEUE -> scontrol
requeue -> resume is one launcher's case of the preemption scenario (tests/faults/test_fault_matrix.py)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from tests.support.launch import REPO, Job, Sbatch, slurm_env
from tests.support.runs import metrics, overrides
from tests.support.slurm import SlurmCluster, assert_completed, cpu_job, read

pytestmark = pytest.mark.slow


def test_smoke_sbatch_wrap_hostname_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "hostname.out"
    job = slurm_cluster.sbatch(f"--output={out}", "--wrap", "hostname -s", cwd=tmp_path)
    slurm_cluster.wait(job, timeout=120)
    assert_completed(slurm_cluster, job, out)
    assert out.read_text().strip() == slurm_cluster.node


def test_train_sbatch_two_ranks_through_srun_exports_a_model(slurm_cluster: SlurmCluster, shard_dirs: dict,
                                                             tiny_model: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = Job(Sbatch(slurm_cluster, cpu_job(1, 2)), ["--config", "configs/demo.yaml",
                                                     *overrides(shard_dirs, tiny_model, out)], tmp_path)
    job.finish(timeout=900)
    log = job.run.log()  # %x-%j.out: the script's --job-name, the job id
    info = assert_completed(slurm_cluster, job.run.id, log)
    assert info["Restarts"] == "0"
    text = read(log)
    assert "2 rank(s)" in text, text[:2000]
    if shutil.which("nvidia-smi") is None:
        assert "accelerator cpu" in text, text[:2000]
    assert "world: 2 rank(s)" in text, text[-4000:]
    assert re.search(r"^0: ", text, re.M), "srun --label prefixes missing"
    # rank 1 is quiet on the console by design (rank-0 events once): its own checkpoint files show it trained
    assert (out / "checkpoints" / "step_00000003" / "commit_rank1.json").is_file()
    assert f"master {slurm_cluster.node}:{10000 + int(job.run.id) % 20000}" in text

    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), text[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "REQUEUE").exists()


def test_shard_sbatch_array_shards_one_subset_per_task(slurm_cluster, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    subsets = ["train-clean-100", "dev-clean"]
    job = slurm_cluster.sbatch("--array=0-1", "--cpus-per-task=1", "--partition=debug", "--time=20",
                               f"--chdir={REPO}", f"--output={tmp_path}/%x-%A_%a.out",
                               "launch/slurm/shard.sbatch",
                               str(corpus), str(out), *subsets, "--", "--shard-size-mb", "0.3",
                               cwd=REPO, env=slurm_env(slurm_cluster))
    slurm_cluster.wait(job, timeout=600)
    for index, subset in enumerate(subsets):
        log = tmp_path / f"w2v-shard-{job}_{index}.out"
        text = read(log)
        assert f"task {index}: {subset} -> {out / subset}" in text, text
        index_json = json.loads((out / subset / "index.json").read_text())
        assert index_json["totals"]["written"] > 0, text
    assert sorted(p.name for p in out.iterdir()) == sorted(subsets)


def test_eval_sbatch_two_ranks_score_every_utterance_once(slurm_cluster, shard_dirs: dict, tiny_model: Path,
                                                         tmp_path: Path) -> None:
    result = tmp_path / "eval.jsonl"
    job = slurm_cluster.sbatch(*cpu_job(1, 2), f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out",
                               "launch/slurm/eval.sbatch", "--model", str(tiny_model),
                               "--shards", str(shard_dirs["dev-clean"]), "--out", str(result), cwd=REPO,
                               env=slurm_env(slurm_cluster))
    log = tmp_path / f"w2v-eval-{job}.out"
    slurm_cluster.wait(job, timeout=600)
    assert_completed(slurm_cluster, job, log)
    assert "2 rank(s)" in read(log)
    lines = [json.loads(line) for line in read(result).splitlines() if line.strip()]
    assert len(lines) == 12, read(log)[-4000:]  # the session corpus's 12 dev-clean utterances, once each
