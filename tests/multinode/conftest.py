"""Two network-namespace nodes shared by the multi-node tests (tests/multinode/cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster import Node, can_make_namespaces, two_nodes


@pytest.fixture(scope="session")
def nodes() -> Iterator[tuple[Node, Node]]:
    reason = can_make_namespaces()
    if reason:
        pytest.skip(reason)
    with two_nodes() as pair:
        yield pair
