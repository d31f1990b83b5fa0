"""How every benchmark reports: one JSON line per measurement, the summary also as a table.

Kept free of torch so that ``bench shard`` runs in a process that never imported it (its workers fork).
"""

from __future__ import annotations

import json
import sys
from typing import Any

SR = 16_000


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """One JSON line per measurement on stdout; the summary also as a short table on stderr (stdout stays
    machine-readable)."""
    print(json.dumps(record), flush=True)
    if record.get("measure") == "summary":
        print(summary_table(record), file=sys.stderr, flush=True)
    return record


def summary_table(record: dict[str, Any]) -> str:
    rows = [(key, f"{value:.4g}" if isinstance(value, float) else str(value)[:60])
            for key, value in record.items() if key != "measure" and not isinstance(value, dict)]
    width = max((len(key) for key, _ in rows), default=0)
    return "\n".join(["summary", "-" * (width + 20), *(f"{key:<{width}}  {value}" for key, value in rows)])
