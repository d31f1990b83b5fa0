"""DeepSpeed's checkpoint files, read safely: loading without unpickling code, the ZeRO weights gathered, and
the universal (any world size) conversion."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

LATEST_UNIVERSAL = "latest_universal"
"""What ``ds_to_universal`` writes beside its output folder: the folder's name (we always name it
ourselves)."""


CHECKPOINT_CLASSES = (fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum)
"""The only non-tensor classes DeepSpeed's checkpoint files hold (ZeRO 0-3, bf16/fp16/fp32): nothing else is
unpickled on resume."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside :data:`CHECKPOINT_CLASSES`: it is not loaded."""


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, containers and DeepSpeed's few classes, never
    code."""
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_CLASSES)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds a pickled object that a checkpoint written by w2v-dist "
            f"never contains ({found.group(1) if found else err}). Loading it would run code from whoever "
            "could write the checkpoint directory; use a checkpoint you wrote, or start a new output_dir"
        ) from None


def check_checkpoint_files(files: Iterable[Path]) -> None:
    """Refuse checkpoint files any of which would unpickle more than :data:`CHECKPOINT_CLASSES`
    (:class:`UnsafeCheckpointError`, naming the file and the class), before a tool that cannot load safely
    (DeepSpeed's ``zero_to_fp32`` and ``ds_to_universal``) opens them. Runs nothing from the files. A file
    that ``torch.load`` cannot read at all is refused too: what it holds cannot be checked."""
    for path in sorted(files):
        try:
            safe_load(path, map_location="cpu")
        except (OSError, UnsafeCheckpointError):
            raise
        except Exception as err:  # torch reports a file that is no checkpoint in many ways (EOFError...)
            raise UnsafeCheckpointError(f"refusing to load {path}: it is not a checkpoint file torch can "
                                        f"read ({type(err).__name__}: {err}), so what it holds cannot be "
                                        "checked; remove it, or start a new output_dir") from None


def zero_checkpoint_weights(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO 1-3 checkpoint, its optimizer partitions gathered by DeepSpeed's
    ``zero_to_fp32``, which unpickles with ``weights_only=False``: the files it opens (the tag's top-level
    ``*_model_states.pt`` and ``*_optim_states.pt``; it looks nowhere else) are checked first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_checkpoint_files((root / tag).glob("*.pt"))
    chatter = io.StringIO()  # its prints and shard bars narrate a conversion that either works or raises
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag)


class CheckpointFiles:
    """Wraps DeepSpeed's checkpoint engine: records every file this rank writes (the commit manifest lists
    them) and loads without unpickling code (:func:`safe_load`). Anything else goes to DeepSpeed's engine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[Path] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        self.inner.save(state_dict, path)
        self.written.append(Path(path))

    load = staticmethod(safe_load)


def convert_to_universal(tag_dir: Path, target: Path, records: Collection[str] = ()) -> None:
    """DeepSpeed's ``ds_to_universal`` on a tag written by any world size, into a fresh ``target``
    (atomically).

    Nothing from an earlier conversion is trusted: ``target`` as found on disk (and the converter's
    leftovers) is deleted first, never loaded. The converter unpickles with ``weights_only=False`` every file
    it finds under ``tag_dir``: it walks sub-directories and picks files by name prefix (``mp_rank_``,
    ``zero_pp_rank_``...), whatever their suffix. So every file under ``tag_dir`` except ``records`` (paths
    relative to ``tag_dir`` that no DeepSpeed tool opens: our JSON records) is checked first with
    :func:`check_checkpoint_files`. What the converter then writes comes from checked files only, which is
    why DeepSpeed's universal loader, which opens ``zero/**.pt`` with ``weights_only=False``, may load
    ``target`` straight after. A fresh interpreter: the converter forks worker pools, which a rank with
    running threads must not do itself."""
    tmp = target.with_name(f".{target.name}.tmp")
    latest = tmp.parent / LATEST_UNIVERSAL
    for stale in (target, tmp, latest):
        remove(stale)
    check_checkpoint_files(Path(root, name) for root, _, names in os.walk(tag_dir) for name in names
                           if Path(root, name).relative_to(tag_dir).as_posix() not in records)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2",
               "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode != 0:
        raise RuntimeError(f"converting {tag_dir} to DeepSpeed's universal checkpoint failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    latest.unlink(missing_ok=True)  # it names the temp folder, which is about to be renamed
    tmp.replace(target)


def remove(path: Path) -> None:
    """Delete a file, a link or a directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
