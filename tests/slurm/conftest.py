"""The one-node SLURM cluster of the launch-script tests (tests/slurm/slurmlib.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from slurmlib import SlurmCluster, start_cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with start_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
