"""One run per output_dir: a second run started while the first one runs refuses at once, naming the first,
and writes nothing there; the first goes on to one clean timeline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.launch import REPO, run_single
from tests.support.runs import metrics, overrides
from w2v_dist.faults import pause_env, pause_marker
from w2v_dist.lock import LEASE_FILE

pytestmark = pytest.mark.slow
STEPS = 4


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory``: (size, mtime in ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_run_on_a_busy_output_dir_refuses_naming_the_holder_and_writes_nothing(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    args = ["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, out, **{
        "trainer.max_steps": STEPS, "trainer.eval_every": 2, "trainer.save_every": 2})]
    # Held after update 1 (a pause point, then SIGSTOP until the second run is done): lease and all, nothing
    # of the first run changes meanwhile.
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_MODE="disabled", **pause_env("step#1", 0, 5, markers))
    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not pause_marker(markers, "step#1", 0).exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(out)
        started = time.monotonic()
        second = run_single(args, timeout=180)
        refused_in = time.monotonic() - started
        assert snapshot(out) == before, "the refused run wrote under output_dir"
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 1, second.stderr[-4000:]
    refusal = second.stderr.strip().splitlines()[-1]
    assert refusal.startswith(f"train: output_dir {out} is in use by another run: host "
                              f"{socket.gethostname()}, pid {first.pid}, no SLURM job, launch "), refusal
    assert "last renewed" in refusal and str(out / LEASE_FILE) in refusal, refusal
    assert "Traceback" not in second.stderr, second.stderr[-4000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))  # one timeline
    assert not (out / LEASE_FILE).exists()  # released at exit
    print(f"the second run refused in {refused_in:.1f} s (process start included)")

