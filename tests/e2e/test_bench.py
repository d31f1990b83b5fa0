"""The benchmarks run and report what they promise (their numbers are recorded in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import free_port, launch_env

pytestmark = pytest.mark.slow


def test_bench_loader_prints_one_json_line_per_measurement(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "bench", "loader", "--utterances", "24",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["measure"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert {"corpus", "raw_decode", "ours", "seed_style", "padding", "resume_skip", "http",
            "summary"} <= set(records)
    summary = records["summary"]
    assert 0 < summary["fraction_of_raw_decode"] and 0 <= summary["padding_fraction"] < 1
    assert records["padding"]["ours"] < records["padding"]["random_same_size"]
    assert 0 < summary["batch_shapes_per_epoch_bounded_16"] < summary["batch_shapes_per_epoch"] / 10
    assert records["padding"]["bounded_16_planned_train_clean_100_scale"] < 0.06
    assert records["resume_skip"]["samples_skipped"] > 0
    assert "fraction_of_raw_decode" in proc.stderr.split("summary\n", 1)[1]  # the short table


def bench_plan(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "bench", "plan", "--resume-updates", "40",
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = map(json.loads, proc.stdout.splitlines())
    return record


def test_bench_plan_measures_the_plan_and_refuses_what_the_run_would_refuse() -> None:
    """A sample's byte range is all a reader requests (read amplification 1; streaming the shards it touches
    whole, as without byte ranges, reads more); over the updates of 3 epochs every utterance is read 3 times
    (with a mix, once in each epoch that samples it);
    the index is held in columns of under 64 B per utterance."""
    whole = bench_plan("--hours", "7.77", "--ranks", "2", "--workers", "1", "--config", "configs/base.yaml")
    assert (whole["shards"], whole["slots"], whole["read_amplification"]) == (2, 2, 1.0)
    assert whole["reads_min"] == whole["reads_max"] == 3 and whole["refused"] is None
    assert whole["reads_not_as_planned"] == 0 and whole["read_in_every_epoch"] == 1.0
    assert 0 < whole["plan_s_per_worker_epoch"] and 0 <= whole["padding"] < 0.05 and whole["resume_s"] > 0
    assert 0 < whole["index_bytes_per_utt"] < 64 and whole["rank_start_s"] > 0
    mixed = bench_plan("--hours", "5", "--ranks", "4", "--workers", "2", "--mix", "--speed-perturb")
    assert mixed["slots"] == 8 and mixed["read_amplification"] == 1.0
    assert mixed["read_amplification_without_offsets"] > 1.0 and mixed["speeds"] == [0.9, 1.0, 1.1]
    assert mixed["reads_not_as_planned"] == 0 and mixed["read_in_every_epoch"] < 1.0  # a mix reads a part
    refused = bench_plan("--hours", "0.05", "--ranks", "8", "--workers", "4")
    assert refused["refused"].startswith("data: 32 data slots (8 streams x 4 readers) cannot all read: "
                                         "epoch 0 reads 15 utterances")


def test_bench_shard_compares_with_a_raw_copy(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "bench", "shard", "--utterances", "12",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["measure"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["summary"]["fraction_of_raw_copy"] > 0 and records["shard"]["audio_hours_per_second"] > 0
    assert records["summary"]["speedup_over_one_worker"] > 0
    summary = records["summary"]
    assert summary["copy_workers"] == summary["workers"] == records["raw_copy"]["workers"]


GPU_STEP_SCRIPT = """
import json, sys
from pathlib import Path
from benchmarks.gpu import planned_batches
from benchmarks.gpu_step import Trial, measure_variant
from w2v_dist.model import init_model
from w2v_dist.run import start_process

start_process(30.0)
model = init_model(Path(sys.argv[1]) / "model", "tiny")
batches = planned_batches(6.0, 3, 32)
bounded = planned_batches(6.0, 3, 32, shape_quantum=16)
for trial, data in ((Trial("ours"), batches), (Trial("bare", bare=True), batches),
                    (Trial("bounded", shape_quantum=16), bounded)):
    measure_variant(trial, model, data, 1, {"datasheet": None, "measured": 1.0})
print(json.dumps({"shapes": [list(b.input_values.shape) for b in bounded],
                  "utterances": [len(b) for b in bounded]}), file=sys.stderr)
"""


def test_bench_gpu_variants_run_on_the_cpu_too(tmp_path: Path) -> None:
    """CI has no GPU: the timed step (ours, the bare loop with the engine's numerics, and bounded shapes)
    still runs end to end and reports its fields, host syncs counted on the CPU among them."""
    env = launch_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()))
    # From the checkout's root, where `benchmarks` is importable.
    proc = subprocess.run([sys.executable, "-c", GPU_STEP_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in records] == ["ours", "bare", "bounded"]
    for record in records:
        assert record["audio_seconds_per_second"] > 0 and record["steps"] == 2
        assert record["tflops"] > 0 and 0 < record["mfu_measured"] < 1
        assert record["top_host_ops_ms_per_step"] and record["graphs_compiled_while_timed"] == 0
        # The guard's one read, at least (the optimizer's are counted too).
        assert record["host_syncs_counted"] >= 1
    shapes = json.loads(proc.stderr.strip().splitlines()[-1])
    assert all((s[1] - 80) % (16 * 320) == 0 for s in shapes["shapes"])  # grid lengths: 16-frame multiples
