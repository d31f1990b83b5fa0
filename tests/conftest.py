"""Shared fixtures: a small espeak-ng corpus, its shards and a tiny random model, built once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
"""Under ``CI=true`` a skip is a failure: every skip in this suite means the machine lacks what a test needs (root,
network namespaces, ``mount``, SLURM from apt, an optional package), and in CI that must not pass unseen."""


def _failed_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if CI and report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as a skip too
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason.removeprefix('Skipped: ')}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _failed_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector
                               ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module-level skip (``pytest.skip(allow_module_level=True)``, ``importorskip`` at the top of a file)."""
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
