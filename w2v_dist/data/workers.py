"""Process pools for corpus work (probing, synthesis, verification).

They use the ``spawn`` start method: a process that has already run torch (a test session, a notebook, the
demo) holds OpenMP/intra-op thread pools that a ``fork``ed child inherits in a locked state, and torchaudio's
resampling in such a child deadlocks.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn"))
