"""Process pools for corpus work (probing and writing shards, synthesis, verification).

A ``fork``ed worker starts with every module already imported; a ``spawn``ed one is a fresh interpreter that
re-imports numpy and soundfile first. Forking is only
safe while the parent has not imported torch: a process that has run torch (a test session, a notebook, the
demo) holds OpenMP/intra-op thread pools that a forked child inherits in a locked state, and torchaudio's
resampling in such a child deadlocks. Such parents get ``spawn``.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def start_method() -> str:
    if "torch" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "fork"


def process_pool(workers: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
                 ) -> ProcessPoolExecutor:
    """``initializer(*initargs)`` runs once in each worker: with ``fork`` the arguments are inherited, not
    pickled, so a job's large inputs reach the workers for free."""
    pool = ProcessPoolExecutor(max_workers=max(1, workers),
                               mp_context=multiprocessing.get_context(start_method()),
                               initializer=initializer, initargs=initargs)
    # Fork the workers now, while this process has no other threads (a progress bar starts a monitor thread):
    # a fork copies locks that other threads may hold.
    pool.submit(int).result()
    return pool
