"""Fault injection for tests, kept out of the code it tests: NaN losses and Inf gradients through a forward
hook (:func:`injected_faults`), and pause points.

Pause points: named moments at which a test can hold one rank still and deliver a fault (a signal, a kill, a
full disk) exactly there, the way a cluster would.

Off unless ``W2V_DIST_PAUSE_AT`` is set, to ``<moment>[#<n>]:<rank>:<seconds>:<marker dir>``: the n-th time
(default: the first) rank ``<rank>`` reaches ``<moment>`` it creates ``<marker dir>/<moment>.rank<rank>`` (so
the test knows where it is) and sleeps ``<seconds>``, then goes on. Moments: ``started`` (loaders running,
before the first step), ``backward`` (mid-step: the step's first all-reduce and the forward done, before the
backward and DeepSpeed's gradient reduction), ``step`` (an update just applied), ``eval`` (mid dev
evaluation), ``save`` (after the rank's checkpoint files, before its commit manifest), ``export-final`` and
``export-best`` (the Hugging Face export written, not yet renamed into place).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PAUSE_ENV = "W2V_DIST_PAUSE_AT"
_reached: Counter[str] = Counter()


def pause_env(moment: str, rank: int, seconds: float, marker_dir: Path) -> dict[str, str]:
    """The environment that holds rank ``rank`` still for ``seconds`` at ``moment`` (``<name>[#<n>]``):
    the spec :func:`pause_point` reads; the rank then creates :func:`pause_marker`."""
    return {PAUSE_ENV: f"{moment}:{rank}:{seconds}:{marker_dir}"}


def pause_marker(marker_dir: Path | str, moment: str, rank: int) -> Path:
    """The file rank ``rank`` creates in ``marker_dir`` as it pauses at ``moment`` (``<name>[#<n>]``)."""
    return Path(marker_dir, f"{moment.partition('#')[0]}.rank{rank}")


def pause_point(moment: str, rank: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    wanted, wanted_rank, seconds, marker_dir = spec.split(":", 3)
    name, _, occurrence = wanted.partition("#")
    if name != moment or int(wanted_rank) != rank:
        return
    _reached[moment] += 1
    if _reached[moment] == int(occurrence or 1):
        pause_marker(marker_dir, moment, rank).touch()
        time.sleep(float(seconds))


@contextmanager
def injected_faults(model: torch.nn.Module, nan_loss: bool, inf_grad: bool) -> Iterator[None]:
    """While open, every training forward of ``model`` returns NaN logits, so a NaN loss (``nan_loss``),
    and/or logits whose gradient is infinite (``inf_grad``): what the NaN/Inf guard must catch
    (``trainer.inject``). The loss is computed outside the model (``w2v_dist/ctc.py``), from the logits."""
    if not (nan_loss or inf_grad):
        yield
        return

    def corrupt(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if nan_loss and module.training:
            output.logits = output.logits * math.nan
        if inf_grad and output.logits.requires_grad:
            output.logits.register_hook(lambda grad: grad * math.inf)
        return output

    handle = model.register_forward_hook(corrupt)
    try:
        yield
    finally:
        handle.remove()
