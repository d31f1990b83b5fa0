"""The benchmarks run and report what they promise (their numbers are recorded in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_loader_prints_one_json_line_per_measurement(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "bench", "loader", "--utterances", "24",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["measure"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert {"corpus", "raw_decode", "ours", "seed_style", "padding", "resume_skip", "http", "summary"} <= set(records)
    summary = records["summary"]
    assert 0 < summary["fraction_of_raw_decode"] and 0 <= summary["padding_fraction"] < 1
    assert records["padding"]["ours"] < records["padding"]["random_same_size"]
    assert records["resume_skip"]["samples_skipped"] > 0


def test_bench_shard_compares_with_a_raw_copy(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "bench", "shard", "--utterances", "12",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["measure"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["summary"]["fraction_of_raw_copy"] > 0 and records["shard"]["audio_hours_per_second"] > 0
