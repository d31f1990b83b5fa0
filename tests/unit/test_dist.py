from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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

    from w2v_dist.engine import check_accelerator

    class CPU:
        def device_name(self) -> str:
            return "cpu"

    monkeypatch.setattr(deepspeed, "get_accelerator", CPU)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    check_accelerator("bf16")
    check_accelerator("fp32")
    with pytest.raises(RuntimeError, match="fp16 needs a GPU"):
        check_accelerator("fp16")
