"""The lease on output_dir (w2v_dist/lock.py): take, renew, release, stale, takeover, and what other ranks
do."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest

from w2v_dist import lock as lock_module
from w2v_dist.dist import World
from w2v_dist.lock import LEASE_FILE, Holder, OutputDirInUse, OutputDirLock, launch_id, read_lease


@pytest.fixture(autouse=True)
def launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch of our own, outside SLURM; no waiting for contenders."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "12345")
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lock_module, "SETTLE_SECONDS", 0.0)


def held_by(directory: Path, **changes: object) -> Holder:
    """Write a lease held by this very process (alive, on this host) under another launch, with
    ``changes``."""
    holder = replace(Holder.this_process(), launch="node9/127.0.0.1:29500",
                     **changes)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LEASE_FILE).write_text(json.dumps(asdict(holder)))
    return holder


def gone_pid() -> tuple[int, float]:
    """The pid and start time of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_take_writes_who_holds_it_and_release_removes_it(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    lock = OutputDirLock(tmp_path / "run", stale_seconds=300)
    lock.take()
    lease = read_lease(tmp_path / "run" / LEASE_FILE)
    assert lease is not None and (lease.host, lease.pid, lease.job, lease.restart) == (
        socket.gethostname(), os.getpid(), "4242", 2)
    assert lease.launch == launch_id() == f"{socket.gethostname()}/127.0.0.1:12345 slurm 4242 restart 2"
    assert abs(lease.renewed - time.time()) < 5 and lease.started == psutil.Process().create_time()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LEASE_FILE]  # no temp file left
    lock.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists()


def test_a_live_holder_is_refused_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    holder = held_by(tmp_path, job="99", restart=1, renewed=time.time() - 42)
    before = (tmp_path / LEASE_FILE).read_text()
    with pytest.raises(OutputDirInUse) as refused:
        OutputDirLock(tmp_path, stale_seconds=300).take()
    message = str(refused.value)
    assert f"host {holder.host}, pid {holder.pid}, SLURM job 99 (restart 1)" in message
    assert "last renewed 42 s ago" in message and str(tmp_path / LEASE_FILE) in message
    assert (tmp_path / LEASE_FILE).read_text() == before  # untouched


def test_another_step_of_the_same_job_and_restart_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    held_by(tmp_path, job="77", restart=0)
    with pytest.raises(OutputDirInUse):
        OutputDirLock(tmp_path, stale_seconds=300).take()


@pytest.mark.parametrize("case", ["stale", "gone", "pid-reused", "requeued", "unreadable"])
def test_a_dead_stale_or_requeued_holder_is_taken_over_with_a_warning(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    if case == "stale":
        held_by(tmp_path, renewed=time.time() - 301)
        reason = "last renewed 301 s ago (stale after 300 s"
    elif case == "gone":
        pid, started = gone_pid()
        held_by(tmp_path, pid=pid, started=started)
        reason = f"its process {pid} on this host is gone"
    elif case == "pid-reused":  # this process's pid, but another process's start time
        held_by(tmp_path, started=psutil.Process().create_time() - 1000)
        reason = f"its process {os.getpid()} on this host is gone"
    elif case == "requeued":
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        held_by(tmp_path, job="77", restart=0)
        reason = "SLURM job 77 was requeued (restart 0 held it, this is restart 1)"
    else:
        (tmp_path / LEASE_FILE).write_text("not json")
        reason = "is not a lease"
    lock = OutputDirLock(tmp_path, stale_seconds=300)
    with caplog.at_level(logging.WARNING, logger="w2v_dist.lock"):
        lock.take()
    assert reason in caplog.text and "taking over the lock of" in caplog.text
    assert (Holder.this_process().launch
            == read_lease(tmp_path / LEASE_FILE).launch)  # type: ignore[union-attr]
    lock.release()


def test_the_holder_renews_from_a_thread_and_stops_at_release(tmp_path: Path) -> None:
    lock = OutputDirLock(tmp_path, stale_seconds=1.0)  # renewed every 0.1 s
    lock.take()
    first = read_lease(tmp_path / LEASE_FILE)
    time.sleep(0.5)
    renewed = read_lease(tmp_path / LEASE_FILE)
    assert first is not None and renewed is not None and renewed.renewed > first.renewed
    assert renewed.launch == first.launch and renewed.pid == first.pid
    lock.release()
    time.sleep(0.3)
    assert not (tmp_path / LEASE_FILE).exists()  # the thread did not put it back


def test_a_holder_that_was_taken_over_stops_and_leaves_the_new_lease_alone(tmp_path: Path) -> None:
    lock = OutputDirLock(tmp_path, stale_seconds=1.0)
    lost: list[Holder | None] = []
    lock._lost = lost.append  # type: ignore[method-assign]  # the real one ends the process
    lock.take()
    successor = held_by(tmp_path, job="5")
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and lost[0] == successor
    lock.release()
    assert read_lease(tmp_path / LEASE_FILE) == successor


def test_a_lease_deleted_by_hand_is_taken_again(tmp_path: Path) -> None:
    lock = OutputDirLock(tmp_path, stale_seconds=1.0)
    lock.take()
    (tmp_path / LEASE_FILE).unlink()
    time.sleep(0.4)
    assert read_lease(tmp_path / LEASE_FILE) is not None
    lock.release()


def test_rank_0_claims_the_lease_and_returns_its_refusal_other_ranks_never_touch_it(tmp_path: Path) -> None:
    lock = OutputDirLock(tmp_path / "free", stale_seconds=300)
    assert lock.claim(World(0, 0, 2)) is None and read_lease(tmp_path / "free" / LEASE_FILE) is not None
    lock.release()
    held_by(tmp_path / "busy")
    refusal = OutputDirLock(tmp_path / "busy", stale_seconds=300).claim(World(0, 0, 2))
    assert refusal is not None and refusal.startswith(
        f"output_dir {tmp_path / 'busy'} is in use by another run")
    # rank 1 neither waits for the lease nor judges it: rank 0 decides for the launch
    started = time.monotonic()
    assert OutputDirLock(tmp_path / "busy", stale_seconds=300).claim(World(1, 1, 2)) is None
    assert OutputDirLock(tmp_path / "nowhere", stale_seconds=300).claim(World(1, 1, 2)) is None
    assert time.monotonic() - started < 1 and not (tmp_path / "nowhere").exists()


def test_every_rank_raises_rank_0s_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock_module, "all_gather_objects", lambda obj: ["output_dir x is in use", None])
    with pytest.raises(OutputDirInUse, match="output_dir x is in use"):
        OutputDirLock.agree(None)  # rank 1's own view: rank 0's refusal still stops it
    monkeypatch.setattr(lock_module, "all_gather_objects", lambda obj: [None, None])
    OutputDirLock.agree(None)


def test_a_forked_child_does_not_release_its_parents_lease(tmp_path: Path) -> None:
    lock = OutputDirLock(tmp_path, stale_seconds=300)
    lock.take()
    child = os.fork()
    if child == 0:
        lock.release()
        os._exit(0)
    os.waitpid(child, 0)
    assert (tmp_path / LEASE_FILE).exists()
    lock.release()
