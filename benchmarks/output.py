"""How every benchmark times and reports: one JSON line per measurement, the summary also as a table.

Kept free of torch so that ``bench shard`` runs in a process that never imported it (its workers fork).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from w2v_dist import console

SR = 16_000
T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """What ``work()`` returns, and the seconds it took."""
    start = time.perf_counter()
    return work(), time.perf_counter() - start


def elapsed(step: Callable[[T], object], items: Iterable[T]) -> float:
    """The seconds ``step`` takes over ``items``, one call each."""
    start = time.perf_counter()
    for item in items:
        step(item)
    return time.perf_counter() - start


def interleaved_medians(trials: dict[str, Callable[[], float]], rounds: int,
                        warmup: int = 0) -> dict[str, float]:
    """The median of each trial's measurement over rounds in which the trials take turns, so that machine
    noise hits them alike; the first ``warmup`` rounds are not counted."""
    values: dict[str, list[float]] = {name: [] for name in trials}
    for _ in range(warmup + rounds):
        for name, trial in trials.items():
            values[name].append(trial())
    return {name: statistics.median(v[warmup:]) for name, v in values.items()}


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """One JSON line per measurement on stdout; the summary also as a short table on stderr (stdout stays
    machine-readable)."""
    console.emit(json.dumps(record))  # the real stdout: libraries' prints go to stderr (w2v_dist.console)
    if record.get("measure") == "summary":
        print(summary_table(record), file=sys.stderr, flush=True)
    return record


def summary_table(record: dict[str, Any]) -> str:
    rows = [(key, f"{value:.4g}" if isinstance(value, float) else str(value)[:60])
            for key, value in record.items() if key != "measure" and not isinstance(value, dict)]
    width = max((len(key) for key, _ in rows), default=0)
    return "\n".join(["summary", "-" * (width + 20), *(f"{key:<{width}}  {value}" for key, value in rows)])
