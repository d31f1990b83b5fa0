"""Resume and export load DeepSpeed checkpoints without unpickling code (weights_only + an allowlist)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from w2v_dist.engine import UnsafeCheckpointError, check_checkpoint_files, safe_load


class Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint would carry."""

    def __reduce__(self) -> tuple:
        return (os.system, ("touch PWNED",))


def test_tensors_and_deepspeed_classes_load(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    state = {"w": torch.ones(3), "loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # DeepSpeed's default format
    loaded = safe_load(path)
    assert torch.equal(loaded["w"], torch.ones(3)) and loaded["zero_stage"] == ZeroStageEnum.gradients
    check_checkpoint_files(tmp_path)


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_checkpoint_carrying_other_pickled_objects_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                zipfile: bool) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1)}, "extra": Payload()}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*mp_rank_00_model_states.pt.*posix.system"):
        safe_load(path)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        check_checkpoint_files(tmp_path)
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(pickle.UnpicklingError):  # what DeepSpeed's own loader would have run instead
        torch.load(path, weights_only=True)
