"""Shared fixtures: a small espeak-ng corpus, its shards, a tiny random model and the fault matrix's
uninterrupted run, built once per session; the clusters (nodes made of network namespaces, SLURM on one node
or on two). Under ``CI=true`` a skip fails. ``--skip-heavy`` deselects the tests that start a cluster
(markers ``multinode`` and ``slurm``: every test under tests/multinode and tests/slurm, and the launcher
cases of the scenarios that run elsewhere), for a quick local run; CI runs everything and refuses the
option."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.cluster import Node
    from tests.support.slurm import SlurmCluster

TESTS = Path(__file__).resolve().parent
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
"""Under ``CI=true`` a skip is a failure: every skip in this suite means the machine lacks what a test needs
(root, network namespaces, ``mount``, SLURM from apt, an optional package), and in CI that must not pass
unseen."""
HEAVY = {"multinode": TESTS / "multinode", "slurm": TESTS / "slurm"}
"""The markers of the tests that start a cluster, and the folders whose every test carries one."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-heavy", action="store_true",
                     help="deselect the tests that start a cluster (markers: " + ", ".join(HEAVY) + ")")


def pytest_configure(config: pytest.Config) -> None:
    if CI and config.getoption("--skip-heavy"):
        raise pytest.UsageError("--skip-heavy under CI=true: CI runs every test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, folder in HEAVY.items():
            if item.path.is_relative_to(folder):
                item.add_marker(marker)
    if config.getoption("--skip-heavy"):
        heavy = [item for item in items if any(item.get_closest_marker(marker) for marker in HEAVY)]
        config.hook.pytest_deselected(items=heavy)
        items[:] = [item for item in items if item not in heavy]


def _failed_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if CI and report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as a skip too
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        report.outcome = "failed"
        reason = reason.removeprefix("Skipped: ")
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _failed_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector
                               ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module-level skip (``pytest.skip(allow_module_level=True)``, ``importorskip`` atop a file)."""
    report = yield
    _failed_skip(report)
    return report


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from w2v_dist.prep.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("corpus"), utterances=48, dev_utterances=12, workers=2)


@pytest.fixture(scope="session")
def shard_dirs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from w2v_dist.prep.shards import ShardOptions, shard_corpus
    from w2v_dist.prep.sources import librispeech_sources

    out = tmp_path_factory.mktemp("shards")
    dirs = {}
    for subset, size in (("train-clean-100", 0.3), ("dev-clean", 0.1)):
        dirs[subset] = out / subset
        shard_corpus(librispeech_sources(corpus, [subset]), dirs[subset],
                     ShardOptions(shard_size_mb=size, workers=2), {"subsets": [subset]})
    return dirs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from w2v_dist.model import init_model

    return init_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def reference(shard_dirs: dict, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault matrix's run (``tests.support.runs.SCHEDULE``), 2 ranks on one node, uninterrupted: what
    every interrupted, relaunched or multi-node run of it must end with."""
    from tests.support.launch import run_deepspeed
    from tests.support.runs import check, job_args

    out = tmp_path_factory.mktemp("reference") / "run"
    check(run_deepspeed(job_args(shard_dirs, tiny_model, out)))
    return out


@pytest.fixture(scope="session")
def nodes() -> Iterator[tuple[Node, Node]]:
    """Two nodes made of network namespaces (``tests.support.cluster``)."""
    from tests.support.cluster import can_make_namespaces, two_nodes

    reason = can_make_namespaces()
    if reason:
        pytest.skip(reason)
    with two_nodes() as pair:
        yield pair


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """SLURM on this machine, one node (``tests.support.slurm``)."""
    from tests.support.slurm import start_cluster

    with start_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_two_nodes(nodes: tuple[Node, Node], tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[SlurmCluster]:
    """SLURM on the two namespace nodes: one slurmd on each, slurmctld on the first. Per module: a test that
    kills a node's processes (tests/multinode/test_two_nodes.py) must not find its daemons there."""
    from tests.support.slurm import start_cluster

    with start_cluster(tmp_path_factory.mktemp("slurm2"), [(n.name, n.address) for n in nodes],
                       on_node=lambda index, argv: nodes[index].command(argv)) as cluster:
        yield cluster
