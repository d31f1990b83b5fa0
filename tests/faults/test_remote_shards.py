"""Remote shards that fail mid-transfer are re-opened, skipping what was read; a shard that keeps failing
stops the run naming it (without its credentials)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from tests.support.data import POLICY, http_server, preprocess
from w2v_dist.data.index import load_shard_set
from w2v_dist.data.loader import EvalStream, TrainStream, make_loader
from w2v_dist.data.plan import StreamLayout
from w2v_dist.data.shard_reader import RemoteShardError, RetryPolicy

FAST = RetryPolicy(attempts=3, backoff_seconds=0.05)


def epoch(location: str, model: Path, retry: RetryPolicy, shard_command: str = "") -> tuple[list[str], int]:
    """Every key of one pass over the set (one rank, one worker) and the retries the batches reported."""
    stream = EvalStream(load_shard_set(location, shard_command), POLICY, preprocess(model), rank=0,
                        world_size=1, retry=retry)
    batches = list(make_loader(stream, 1, 2))
    return [k for b in batches for k in b.keys], sum(b.skips.get("shard_retries", 0) for b in batches)


def test_dropped_connections_are_retried_and_every_utterance_arrives_once(shard_dirs: dict,
                                                                          tiny_model: Path) -> None:
    directory = shard_dirs["train-clean-100"]
    expected, retries = epoch(str(directory), tiny_model, FAST)
    assert retries == 0
    with http_server(directory, drops=2) as url:
        got, retries = epoch(url, tiny_model, FAST)
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    shards = len(load_shard_set(str(directory)).urls)
    assert retries == 2 * shards, "every shard was cut twice, and each retry is counted"


def test_a_shard_that_keeps_failing_stops_the_run_naming_it(shard_dirs: dict, tiny_model: Path) -> None:
    directory = shard_dirs["train-clean-100"]
    with http_server(directory, drops=100) as url:
        credentialed = url.replace("http://", "http://reader:pw-0123456789@")
        start = time.monotonic()
        with pytest.raises(RemoteShardError,
                           match=r"shard http://\*\*\*@127\.0\.0\.1:\d+/shard-00000\d\.tar "
                                 r"failed 3 times") as failure:
            # At the start: the stream asks the server for one sample's byte range before any worker runs.
            stream = TrainStream(load_shard_set(credentialed), POLICY, preprocess(tiny_model), rank=0,
                                 world_size=1, layout=StreamLayout(1, 1, 1), retry=FAST)
            list(itertools.islice(iter(make_loader(stream, 0, 2)), 20))
    assert time.monotonic() - start < 30
    assert "pw-0123456789" not in str(failure.value)


def test_a_failing_pipe_command_is_retried(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    directory = shard_dirs["train-clean-100"]
    script = tmp_path / "fetch.sh"
    # Fails on its first call for each shard, after writing part of it (like a cut download), then works.
    script.write_text('#!/bin/sh\nmark="$0.$(basename "$1")"\n'
                      'if [ ! -e "$mark" ]; then touch "$mark"; head -c 20000 "$1"; exit 3; fi\ncat "$1"\n')
    script.chmod(0o755)
    expected, _ = epoch(str(directory), tiny_model, FAST)
    got, retries = epoch(str(directory), tiny_model, FAST,
                         shard_command=f"pipe:{script} {directory}/{{shard}}")
    assert sorted(got) == sorted(expected) and retries == len(load_shard_set(str(directory)).urls)


@pytest.mark.slow
def test_secrets_never_reach_what_the_run_writes(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """A token in the environment (used through ${oc.env:...}), a password in a URL and a bearer token in the
    shard command: none of them appears in any file under output_dir (config.yaml, checkpoints, metrics, the
    wandb offline run) or in the console. The server also cuts every shard once: the retries reach
    metrics.jsonl."""
    from tests.support.launch import REPO, run_single
    from tests.support.runs import check, metrics, overrides

    secrets = {"W2V_TEST_TOKEN": "tok-env-0123456789abcdef", "url": "literal-url-pass-98765",
               "header": "literal-cmd-token-0123456789"}
    out = tmp_path / "run"
    config = tmp_path / "no-dev.yaml"  # the shard command serves the training set only
    config.write_text((REPO / "configs" / "debug.yaml").read_text().replace("  dev_shards:\n", "").replace(
        "    dev-clean: work/demo/shards/dev-clean\n", ""))
    with http_server(shard_dirs["train-clean-100"], drops=1) as url:
        host = url.removeprefix("http://")
        command = (f"'pipe:curl -sSf -H \"Authorization: Bearer {secrets['header']}\" "
                   f"http://reader:{secrets['url']}@{host}/{{shard}}'")
        args = overrides(shard_dirs, tiny_model, out,
                         **{"data.train_shards": f"http://reader:${{oc.env:W2V_TEST_TOKEN}}@{host}",
                                            "data.shard_command": command,
                                            "data.remote_backoff_seconds": 0.05, "trainer.eval_every": 0,
                                            "trainer.max_steps": 4, "trainer.save_every": 2,
                                            "logging.wandb.mode": "offline"})
        proc = run_single(["--config", str(config),
                           *[a for a in args if not a.startswith("data.dev_shards")]],
                          env={"W2V_TEST_TOKEN": secrets["W2V_TEST_TOKEN"]})
    check(proc)
    assert any((out / "wandb").glob("offline-run-*")) and any((out / "checkpoints").glob("step_*/*.pt"))
    assert "${oc.env:W2V_TEST_TOKEN}" in (out / "config.yaml").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    for name, secret in secrets.items():
        leaked = [str(p.relative_to(out)) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, f"the {name} secret leaked into {leaked}"
        assert secret not in proc.stderr + proc.stdout, f"the {name} secret reached the console"
    retries = [r["loader_skips"].get("shard_retries", 0) for r in metrics(out) if "loader_skips" in r]
    assert retries[-1] > 0, retries
