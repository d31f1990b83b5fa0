"""A first run killed while DeepSpeed JIT-builds its CPU all-reduce op must not leave later runs hung on the
lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.launch import REPO, launch_env
from tests.support.runs import check, overrides

pytestmark = pytest.mark.slow


def test_a_run_killed_during_the_op_build_does_not_hang_the_next_one(shard_dirs: dict, tiny_model: Path,
                                                                      tmp_path: Path) -> None:
    extensions = tmp_path / "torch_extensions"  # a cold cache: this run builds the op
    env = launch_env(TORCH_EXTENSIONS_DIR=str(extensions), OMP_NUM_THREADS="2")
    args = [sys.executable, str(REPO / "train.py"), "--config", "configs/debug.yaml",
            *overrides(shard_dirs, tiny_model, tmp_path / "run", **{
                "trainer.max_steps": 1, "trainer.eval_every": 0, "trainer.save_every": 0,
                "data.num_workers": 0})]
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(extensions.rglob("deepspeed_shm_comm/lock")):
        assert first.poll() is None, "the first run ended before it started building the op"
        assert time.monotonic() < deadline, "the op build never started"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # Ctrl-C / preemption / time limit in the middle of the build
    first.wait()
    [stale] = extensions.rglob("deepspeed_shm_comm/lock")

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    check(second)
    assert f"removing {stale}, left by a DeepSpeed op build that was killed" in second.stderr
    assert not stale.exists()
    # The build (20-40 s of silence otherwise) is announced, once, before it starts.
    assert second.stderr.count("building DeepSpeed's deepspeed_shm_comm op in ") == 1
