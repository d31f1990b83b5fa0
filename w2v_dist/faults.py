"""Pause points: named moments at which a test can hold one rank still and deliver a fault (a signal, a kill, a
full disk) exactly there, the way a cluster would.

Off unless ``W2V_DIST_PAUSE_AT`` is set, to ``<moment>:<rank>:<seconds>:<marker dir>``: the first time rank
``<rank>`` reaches ``<moment>`` it creates ``<marker dir>/<moment>.rank<rank>`` (so the test knows where it is)
and sleeps ``<seconds>``, then goes on. Moments: ``started`` (loaders running, before the first step), ``eval``
(mid dev evaluation), ``save`` (after the rank's checkpoint files, before its commit manifest), ``export`` (the
export written, not yet renamed into place).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "W2V_DIST_PAUSE_AT"
_reached: set[str] = set()


def pause_point(moment: str, rank: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec or moment in _reached:
        return
    wanted, wanted_rank, seconds, marker_dir = spec.split(":", 3)
    if wanted != moment or int(wanted_rank) != rank:
        return
    _reached.add(moment)
    Path(marker_dir, f"{moment}.rank{rank}").touch()
    time.sleep(float(seconds))
