from __future__ import annotations

import datetime
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
    exited = {"host": socket.gethostname(), "pid": int(finished.stdout)}
    (tmp_path / "rank1.json").write_text(json.dumps(exited))
    (tmp_path / "rank2.json").write_text(json.dumps({"host": "other-node", "pid": 1}))
    os.utime(tmp_path / "rank2.json", (0, time.time() - 40))
    message = lost_ranks(tmp_path, World(0, 0, 3))
    assert f"rank 1 on {socket.gethostname()} (pid {int(finished.stdout)}) exited" in message
    assert "rank 2 on host other-node: last heartbeat 40 s ago" in message


def test_survivor_names_the_stalled_rank_first_then_ranks_that_are_elsewhere(tmp_path: Path) -> None:
    """A survivor waiting in a collective: a stopped rank (SIGSTOP, as a hung GPU or NFS read looks), a rank
    alive but elsewhere (its loader stalled), and a rank waiting in the same collective, which is only
    counted."""
    host = socket.gethostname()
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        os.kill(sleepers[0].pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        stopped = psutil.Process(sleepers[0].pid)
        while stopped.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
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
    assert message.startswith(f"rank 1 on host {host} (pid {sleepers[0].pid}, stopped): last heartbeat 64 s "
                              "ago, at step 2 in faults.py:48 pause_point; "), message
    assert (f"rank 2 on host {host}: last heartbeat 2 s ago, at step 3 in trainer.py:140 fit < dataloader.py"
            in message)
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
    # a launcher that pinned 2 cores per rank
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
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
    """Two checkouts (two venvs) must not rebuild each other's DeepSpeed op in torch's shared default
    cache."""
    from w2v_dist.process import per_venv_extensions

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv-a"))
    (tmp_path / "venv-a").mkdir()
    per_venv_extensions()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv-a" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    per_venv_extensions()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/chosen"


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                    "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.mark.parametrize(("env", "local_rank_arg", "expected"), [
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, None, World(5, 1, 8)),  # torchrun, deepspeed
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, None, World(3, 1, 4)),  # srun
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, 2, World(3, 0, 4)),  # srun without a local id
    ({"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"}, 1, World(2, 1, 4)),
    ({}, 3, World(0, 3, 1)),  # no launcher; --local_rank names the device
    ({}, None, World(0, 0, 1)),
])
def test_the_world_is_read_from_the_launchers_environment_which_is_left_alone(
        env: dict[str, str], local_rank_arg: int | None, expected: World,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from w2v_dist.process import world_from_env

    given = dict(env)
    assert world_from_env(local_rank_arg, given) == expected
    assert given == env
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = dict(os.environ)
    assert world_from_env(local_rank_arg) == expected  # os.environ by default
    assert dict(os.environ) == before


def test_the_rendezvous_is_read_from_the_environment_and_one_process_meets_itself_on_a_free_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from w2v_dist.process import Rendezvous, rendezvous_from_env

    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29555"}
    assert rendezvous_from_env(World(1, 1, 2), env) == Rendezvous("node0", 29555)
    assert Rendezvous("node0", 29555).init_method == "tcp://node0:29555"
    assert Rendezvous("fd00::1", 29555).init_method == "tcp://[fd00::1]:29555"
    with pytest.raises(RuntimeError, match="MASTER_PORT is not set"):
        rendezvous_from_env(World(1, 1, 2), {"MASTER_ADDR": "node0"})
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    alone = rendezvous_from_env(World(0, 0, 1))
    assert alone.addr == "127.0.0.1" and 0 < alone.port < 2**16
    assert dict(os.environ) == before


def test_the_launch_reaches_the_process_group_as_arguments_and_only_local_rank_is_exported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """srun sets no RANK or WORLD_SIZE: the group gets them (and where to meet) as arguments, not through
    os.environ. DeepSpeed reads LOCAL_RANK from os.environ only, and the output_dir lock tells launches apart
    by MASTER_ADDR:MASTER_PORT: those are written, in one place (process.publish_launch)."""
    import deepspeed
    import torch

    from w2v_dist import process

    calls: dict[str, dict[str, object]] = {}

    def init_process_group(backend: str, **kwargs: object) -> None:
        calls["group"] = {"backend": backend, **kwargs}

    def init_distributed(**kwargs: object) -> None:
        calls["deepspeed"] = kwargs

    assert not torch.distributed.is_initialized()
    c10d = torch.distributed.distributed_c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # restored after the test
        monkeypatch.setattr(c10d, name, getattr(c10d, name))
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    for name in ("build_cpu_comm_op", "release_cpu_shm_buffer", "per_venv_extensions", "setup_console"):
        monkeypatch.setattr(process, name, lambda *args: None)
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "node0",
             "MASTER_PORT": "29555"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    world, device = process.start_process(2.0)
    assert world == World(3, 1, 4) and device == torch.device("cpu")
    assert calls["group"] == {"backend": deepspeed.get_accelerator().communication_backend_name(),
                              "init_method": "tcp://node0:29555", "rank": 3, "world_size": 4,
                              "timeout": datetime.timedelta(minutes=2), "device_id": None}
    assert calls["deepspeed"]["auto_mpi_discovery"] is False  # no RANK in os.environ: no MPI look-up
    assert os.environ["LOCAL_RANK"] == "1" and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("node0", "29555")
