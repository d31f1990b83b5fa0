from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from w2v_dist import dist
from w2v_dist.dist import World, lost_ranks, write_record


def test_survivor_names_the_rank_that_exited(tmp_path: Path) -> None:
    write_record(tmp_path, World(0, 0, 3), "launch")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    (tmp_path / "rank1.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(finished.stdout)}))
    (tmp_path / "rank2.json").write_text(json.dumps({"host": "other-node", "pid": 1}))
    os.utime(tmp_path / "rank2.json", (0, time.time() - 40))
    message = lost_ranks(tmp_path, World(0, 0, 3))
    assert f"rank 1 on {socket.gethostname()} (pid {int(finished.stdout)}) exited" in message
    assert "rank 2 on host other-node: last heartbeat 40 s ago" in message


def test_survivor_names_the_stalled_rank_first_then_ranks_that_are_elsewhere(tmp_path: Path) -> None:
    """A survivor waiting in a collective: a stopped rank (SIGSTOP, as a hung GPU or NFS read looks), a rank alive
    but elsewhere (its loader stalled), and a rank waiting in the same collective, which is only counted."""
    host = socket.gethostname()
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        os.kill(sleepers[0].pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while psutil.Process(sleepers[0].pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = "engine.py:400 backward < distributed_c10d.py:2900 all_reduce"
        records = [(os.getpid(), 3, waiting, 1), (sleepers[0].pid, 2, "faults.py:48 pause_point", 64),
                   (sleepers[1].pid, 3, "trainer.py:140 fit < dataloader.py:1290 _get_data", 2),
                   (sleepers[2].pid, 3, waiting, 1)]
        for rank, (pid, step, where, age) in enumerate(records):
            (tmp_path / f"rank{rank}.json").write_text(json.dumps(
                {"host": host, "pid": pid, "launch": "L", "step": step, "where": where}))
            os.utime(tmp_path / f"rank{rank}.json", (0, time.time() - age))
        message = lost_ranks(tmp_path, World(0, 0, 4))
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    assert message.startswith(f"rank 1 on host {host} (pid {sleepers[0].pid}, stopped): last heartbeat 64 s ago, "
                              "at step 2 in faults.py:48 pause_point; "), message
    assert f"rank 2 on host {host}: last heartbeat 2 s ago, at step 3 in trainer.py:140 fit < dataloader.py" in message
    assert "rank 3" not in message and message.endswith("; 1 more"), message


def test_the_heartbeat_thread_records_the_step_and_where_the_main_thread_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "HEARTBEAT_SECONDS", 0.05)
    dist.start_heartbeat(tmp_path, World(0, 0, 1), "L")
    try:
        dist.heartbeat(7)
        time.sleep(0.5)
        record = json.loads((tmp_path / "rank0.json").read_text())
    finally:
        assert dist._beating is not None
        dist._beating.set()
    assert record["step"] == 7 and record["launch"] == "L" and record["pid"] == os.getpid()
    assert record["where"].startswith("test_dist.py:") and record["where"].endswith(
        " test_the_heartbeat_thread_records_the_step_and_where_the_main_thread_is"), record


def test_loader_workers_auto_splits_the_cores_between_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from w2v_dist.dist import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(3) == 3 and loader_workers(0) == 0  # an explicit value is kept
    assert loader_workers(-1) == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(-1) == 3  # 16 cores / 4 ranks, one left for the rank itself
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a launcher that pinned 2 cores per rank
    assert loader_workers(-1) == 1


def test_console_setup_turns_off_tqdms_monitor_thread() -> None:
    """Progress bars (transformers' included) would start a monitor thread that exits on its own schedule; a
    DataLoader fork at that moment can deadlock the worker (docs/training.md)."""
    from tqdm import tqdm

    from w2v_dist.logging import setup_console

    if tqdm.monitor is not None:  # an earlier bar in this test session started one
        tqdm.monitor.exit()
        tqdm.monitor = None
    tqdm.monitor_interval = 10
    setup_console(1)
    assert tqdm.monitor_interval == 0
    with tqdm(total=1, disable=False) as bar:
        bar.update()
    assert tqdm.monitor is None


def test_fp16_on_the_cpu_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed

    from w2v_dist.process import check_accelerator

    class CPU:
        def device_name(self) -> str:
            return "cpu"

    monkeypatch.setattr(deepspeed, "get_accelerator", CPU)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    check_accelerator("bf16")
    check_accelerator("fp32")
    with pytest.raises(RuntimeError, match="fp16 needs a GPU"):
        check_accelerator("fp16")


def test_torch_extensions_are_kept_per_venv_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """Two checkouts (two venvs) must not rebuild each other's DeepSpeed op in torch's shared default cache."""
    from w2v_dist.process import per_venv_extensions

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv-a"))
    (tmp_path / "venv-a").mkdir()
    per_venv_extensions()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv-a" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    per_venv_extensions()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/chosen"
