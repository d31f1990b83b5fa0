"""Resume and export load DeepSpeed checkpoints without unpickling code (weights_only + an allowlist), on
every path: the same world size (DeepSpeed's loader through safe_load), another world size (every file
checked before DeepSpeed's unrestricted universal converter; a universal/ found on disk deleted, never
loaded) and export."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.launch import REPO, free_port, launch_env, run_deepspeed, run_single
from tests.support.runs import check, overrides
from w2v_dist import dist
from w2v_dist.checkpoint.commit import Checkpointer
from w2v_dist.checkpoint.files import (
    UnsafeCheckpointError,
    check_checkpoint_files,
    convert_to_universal,
    safe_load,
)
from w2v_dist.checkpoint.resume import rng_state

TAG = "step_00000002"
OPTIM = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path | str = "PWNED") -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_tensors_and_deepspeed_classes_load(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    state = {"w": torch.ones(3), "loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # DeepSpeed's default format
    loaded = safe_load(path)
    assert torch.equal(loaded["w"], torch.ones(3)) and loaded["zero_stage"] == ZeroStageEnum.gradients
    check_checkpoint_files([path])


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_checkpoint_carrying_other_pickled_objects_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                zipfile: bool) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / MODEL
    torch.save({"module": {"w": torch.ones(1)}, "extra": Payload()}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError,
                       match=r"refusing to load .*mp_rank_00_model_states.pt.*posix.system"):
        safe_load(path)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        check_checkpoint_files(tmp_path.glob("*.pt"))
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(pickle.UnpicklingError):  # what DeepSpeed's own loader would have run instead
        torch.load(path, weights_only=True)


def write_tag(output_dir: Path, world_size: int) -> Path:
    """A complete tag as ``world_size`` ZeRO ranks write one (DeepSpeed's file names, tensors only, our
    records)."""
    directory = output_dir / "checkpoints" / TAG
    directory.mkdir(parents=True)
    (directory / "world.json").write_text(json.dumps({"world_size": world_size, "step": 2}))
    torch.save({"module": {"w": torch.ones(2)}}, directory / MODEL)
    for rank in range(world_size):
        torch.save({"optimizer_state_dict": {"w": torch.zeros(1)}}, directory / OPTIM.format(rank=rank))
        torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
        files = [f"rng_rank{rank}.pt", OPTIM.format(rank=rank),
                 *([MODEL, "world.json"] if rank == 0 else [])]
        (directory / f"commit_rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "step": 2, "files": {name: (directory / name).stat().st_size for name in files}}))
    (output_dir / "checkpoints" / "latest").write_text(TAG)
    return directory


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": torch.ones(1), "extra": Payload(marker)}, path)


def fake_converter(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
    """Stands in for ``ds_to_universal``: writes what it writes (tensors only) and ``latest_universal``."""
    output = Path(command[command.index("--output_folder") + 1])
    (output / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.ones(2)}, output / "zero" / "w" / "fp32.pt")
    torch.save({"param_groups": []}, output / "zero" / "optimizer_state.pt")
    shutil.copy(output.parent / MODEL, output / MODEL)
    (output.parent / "latest_universal").write_text(output.name)
    return subprocess.CompletedProcess(command, 0, "", "")


@pytest.mark.parametrize("name", [OPTIM.format(rank=1), MODEL, "rng_rank1.pt",
                                  f"nested/{OPTIM.format(rank=0)}", "mp_rank_01_model_states.bak"])
def test_every_file_the_converter_could_open_is_checked_before_it_runs(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ds_to_universal walks the tag's sub-directories and picks files by name prefix, whatever their
    suffix."""
    directory = write_tag(tmp_path, world_size=2)
    plant(directory / name, tmp_path / "PWNED")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the converter ran"))
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load .*{name}.*posix.system"):
        convert_to_universal(directory, directory / "universal", {"world.json", "commit_rank0.json",
                                                                  "commit_rank1.json"})
    assert not (tmp_path / "PWNED").exists()


def test_a_file_that_is_no_checkpoint_is_refused_before_the_converter_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_tag(tmp_path, world_size=2)
    (directory / "mp_rank_01_model_states.txt").write_text("step\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the converter ran"))
    with pytest.raises(UnsafeCheckpointError,
                       match=r"mp_rank_01_model_states.txt: it is not a checkpoint file"):
        convert_to_universal(directory, directory / "universal", {"world.json", "commit_rank0.json",
                                                                  "commit_rank1.json"})


class UniversalLoader:
    """Loads a universal tag the way DeepSpeed's universal loader does: every ``.pt``,
    ``weights_only=False``."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load(self, directory: Path, tag: str | None = None, universal: bool = False) -> dict[str, Any]:
        assert universal and tag is not None
        for path in sorted((directory / tag).rglob("*.pt")):
            torch.load(path, weights_only=False)
            self.loaded.append(path.relative_to(directory / tag).as_posix())
        return {"run": {"step": 2}}


def test_a_universal_dir_found_on_disk_is_rebuilt_never_loaded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_tag(tmp_path, world_size=2)
    shutil.copytree(directory, tmp_path / "clean")
    plant(directory / "universal" / "zero" / "optimizer_state.pt", tmp_path / "PWNED")
    plant(directory / "universal" / "zero" / "w" / "exp_avg.pt", tmp_path / "PWNED")
    # left by an older conversion: not a checkpoint file
    (directory / "latest_universal").write_text("universal")
    monkeypatch.setattr(subprocess, "run", fake_converter)
    engine = UniversalLoader()
    saved = Checkpointer(tmp_path, dist.World(0, 0, 1), keep_last=2).resume(engine)  # type: ignore[arg-type]
    assert saved is not None and saved.run == {"step": 2}
    assert not (tmp_path / "PWNED").exists()
    assert engine.loaded == [MODEL, "zero/optimizer_state.pt", "zero/w/fp32.pt"]  # what the conversion wrote
    assert sorted(p.name for p in directory.iterdir()) == sorted([*(p.name
                                                                    for p in (tmp_path / "clean").iterdir()),
                                                                  "universal"])


@pytest.mark.slow
def test_a_refusal_on_rank_0_reaches_the_other_ranks(tmp_path: Path) -> None:
    """Rank 0 converts while the others wait: they must fail with its reason, not wait for ever (or die of a
    broken connection without one)."""
    directory = write_tag(tmp_path, world_size=1)
    plant(directory / OPTIM.format(rank=0), tmp_path / "PWNED")
    port, worker = str(free_port()), str(REPO / "tests" / "faults" / "safe_loading_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(rank), port, str(tmp_path)], env=launch_env(),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert not (tmp_path / "PWNED").exists()
    for rank, (stdout, stderr) in enumerate(outputs):
        assert f"rank {rank}: UnsafeCheckpointError: " in stdout, stdout + stderr[-3000:]
        assert "posix.system" in stdout and OPTIM.format(rank=0) in stdout, stdout


RUN = {"trainer.update_seconds": 16.0, "deepspeed.zero_stage": 2, "trainer.max_steps": 2,
       "trainer.save_every": 2, "trainer.eval_every": 0}
"""2 data streams of 8 s (2 ranks, or 1 rank with grad_accum 2); the resume on 1 rank trains no further."""


@pytest.fixture(scope="module")
def two_rank_run(shard_dirs: dict, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, ZeRO-2, 2 updates: a checkpoint at step 2 whose optimizer state is partitioned in two."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, out, **RUN)]))
    assert (out / "checkpoints" / TAG / OPTIM.format(rank=1)).is_file()
    return out


def resume_on_one_rank(shard_dirs: dict, tiny_model: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return run_single(["--config", "configs/debug.yaml", *overrides(shard_dirs, tiny_model, out, **RUN)])


@pytest.mark.slow
def test_a_payload_planted_in_a_two_rank_checkpoint_never_runs_on_one_rank(
        two_rank_run: Path, shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    directory = out / "checkpoints" / TAG
    name = OPTIM.format(rank=1)
    state = torch.load(directory / name, weights_only=False)
    state["extra"] = Payload(tmp_path / "PWNED")
    torch.save(state, directory / name, _use_new_zipfile_serialization=zipfile.is_zipfile(directory / name))
    # the checkpoint still counts as complete
    manifest = json.loads((directory / "commit_rank1.json").read_text())
    manifest["files"][name] = (directory / name).stat().st_size
    if "crc32" in manifest:
        manifest["crc32"][name] = zlib.crc32((directory / name).read_bytes())
    (directory / "commit_rank1.json").write_text(json.dumps(manifest))

    proc = resume_on_one_rank(shard_dirs, tiny_model, out)
    assert not (tmp_path / "PWNED").exists()
    assert proc.returncode != 0
    assert f"UnsafeCheckpointError: refusing to load {directory / name}" in proc.stderr, proc.stderr[-6000:]
    assert "posix.system" in proc.stderr


@pytest.mark.slow
def test_a_universal_dir_planted_in_a_two_rank_checkpoint_never_runs_on_one_rank(
        two_rank_run: Path, shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    directory = out / "checkpoints" / TAG
    (directory / "universal").mkdir()
    shutil.copy(directory / MODEL, directory / "universal" / MODEL)  # what the universal loader opens first
    plant(directory / "universal" / "zero" / "optimizer_state.pt", tmp_path / "PWNED")

    proc = resume_on_one_rank(shard_dirs, tiny_model, out)
    assert not (tmp_path / "PWNED").exists()
    check(proc)
    assert "converting" in proc.stderr and (f"resumed from {directory} at step 2 (written by 2 ranks, now 1)"
                                            in proc.stderr)
    safe_load(directory / "universal" / "zero" / "optimizer_state.pt")  # rebuilt by the conversion
