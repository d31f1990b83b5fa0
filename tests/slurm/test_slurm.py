"""The SLURM launch scripts on a real one-node SLURM (see conftest.py): 2 CPU ranks through srun, preemption with
SIGUSR1 -> checkpoint -> REQUEUE -> scontrol requeue -> resume, sharding as a job array, 2-rank evaluation."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
from helpers import overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The scripts' #SBATCH headers ask for 2 GPU nodes on partition "gpu"; the test cluster has one CPU node.
TWO_CPU_RANKS = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                 "--partition=debug", "--time=20"]


def job_env() -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():  # the scripts default to <repo>/.venv/bin/python
        env["W2V_PYTHON"] = sys.executable
    return env


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path} was not written)"


def assert_completed(cluster, job: str, log: Path) -> dict[str, str]:
    info = cluster.job(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{read(log)[-8000:]}"
    return info


def test_smoke_sbatch_wrap_hostname_completes(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "hostname.out"
    job = slurm_cluster.sbatch(f"--output={out}", "--wrap", "hostname -s", cwd=tmp_path)
    slurm_cluster.wait(job, timeout=120)
    assert_completed(slurm_cluster, job, out)
    assert out.read_text().strip() == slurm_cluster.node


def test_train_sbatch_two_ranks_through_srun_exports_a_model(slurm_cluster, shard_dirs: dict, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(*TWO_CPU_RANKS, f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out",
                               "launch/slurm/train.sbatch", "configs/demo.yaml",
                               *overrides(shard_dirs, tiny_model, out), cwd=REPO, env=job_env())
    log = tmp_path / f"w2v-train-{job}.out"  # %x is the script's --job-name
    slurm_cluster.wait(job, timeout=900)
    info = assert_completed(slurm_cluster, job, log)
    assert info["Restarts"] == "0"
    text = read(log)
    assert "2 rank(s)" in text, text[:2000]
    if shutil.which("nvidia-smi") is None:
        assert "accelerator cpu" in text, text[:2000]
    assert "world: 2 rank(s)" in text, text[-4000:]
    assert re.search(r"^0: ", text, re.M), "srun --label prefixes missing"
    # rank 1 is quiet on the console by design (rank-0 events once): its own checkpoint files show it trained
    assert (out / "checkpoints" / "step_00000003" / "commit_rank1.json").is_file()
    assert f"master {slurm_cluster.node}:{10000 + int(job) % 20000}" in text

    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), text[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "REQUEUE").exists()


def test_train_sbatch_preempted_by_sigusr1_requeues_and_resumes(slurm_cluster, shard_dirs: dict, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    """``scancel --signal=USR1`` (what ``--signal=USR1@120`` does before the time limit) mid-run: the trainer stops
    after the current step on every rank, saves, writes REQUEUE and exits 0; the script requeues the job and the
    same command resumes from checkpoints/latest to the end."""
    out, max_steps = tmp_path / "run", 40
    job = slurm_cluster.sbatch(*TWO_CPU_RANKS, f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out",
                               "launch/slurm/train.sbatch", "configs/demo.yaml",
                               *overrides(shard_dirs, tiny_model, out, **{
                                   "trainer.max_steps": max_steps, "trainer.eval_every": 0,
                                   "trainer.save_every": 0}),
                               cwd=REPO, env=job_env())
    log = tmp_path / f"w2v-train-{job}.out"

    signalled = False

    def signal_after_three_steps() -> None:
        nonlocal signalled
        if not signalled and len([r for r in metrics(out) if "loss" in r]) >= 3:
            slurm_cluster.run("scancel", "--signal=USR1", job)
            signalled = True

    slurm_cluster.wait(job, timeout=900, while_running=signal_after_three_steps)
    text = read(log)
    assert signalled, f"the job ended before 3 steps were logged\n{text[-6000:]}"
    info = assert_completed(slurm_cluster, job, log)
    assert info["Restarts"] == "1", f"expected one requeue: {info}\n{text[-6000:]}"

    stopped = re.search(r"stopped at step (\d+) \(SIGUSR1\)", text)
    assert stopped, f"the trainer did not report a SIGUSR1 stop\n{text[-6000:]}"
    stopped_at = int(stopped.group(1))
    assert 3 <= stopped_at < max_steps
    assert f"requeued job {job}" in text and "(restart 1)" in text, text[-6000:]
    assert "resumed from" in text and f"step_{stopped_at:08d}" in text
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, max_steps + 1)), "the resumed run should continue where the preempted one stopped"
    assert (out / "checkpoints" / "latest").read_text() == f"step_{max_steps:08d}"
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "REQUEUE").exists()


def test_shard_sbatch_array_shards_one_subset_per_task(slurm_cluster, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    subsets = ["train-clean-100", "dev-clean"]
    job = slurm_cluster.sbatch("--array=0-1", "--cpus-per-task=1", "--partition=debug", "--time=20",
                               f"--chdir={REPO}", f"--output={tmp_path}/%x-%A_%a.out", "launch/slurm/shard.sbatch",
                               str(corpus), str(out), *subsets, "--", "--shard-size-mb", "0.3",
                               cwd=REPO, env=job_env())
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
    job = slurm_cluster.sbatch(*TWO_CPU_RANKS, f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out",
                               "launch/slurm/eval.sbatch", "--model", str(tiny_model),
                               "--shards", str(shard_dirs["dev-clean"]), "--out", str(result), cwd=REPO, env=job_env())
    log = tmp_path / f"w2v-eval-{job}.out"
    slurm_cluster.wait(job, timeout=600)
    assert_completed(slurm_cluster, job, log)
    assert "2 rank(s)" in read(log)
    lines = [json.loads(line) for line in read(result).splitlines() if line.strip()]
    assert len(lines) == 12, read(log)[-4000:]  # the 12 dev-clean utterances of the session corpus, once each
