from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from w2v_dist.dist import World, dead_ranks, register_rank


def test_survivor_names_the_rank_that_exited(tmp_path: Path) -> None:
    register_rank(tmp_path, World(0, 0, 3))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    (tmp_path / "rank1.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(finished.stdout)}))
    (tmp_path / "rank2.json").write_text(json.dumps({"host": "other-node", "pid": 1}))
    message = dead_ranks(tmp_path, World(0, 0, 3))
    assert f"rank 1 (pid {int(finished.stdout)}) exited" in message and "other-node" in message
