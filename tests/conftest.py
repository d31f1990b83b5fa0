"""Shared fixtures: a small espeak-ng corpus, its shards and a tiny random model, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
