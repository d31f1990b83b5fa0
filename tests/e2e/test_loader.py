"""The streaming loader over real shards: endless, exact resume, every dev utterance once, bad data
skipped."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tests.support.data import (
    POLICY,
    Traffic,
    eval_stream,
    http_server,
    preprocess,
    take_batches,
    train_stream,
)
from w2v_dist.data.index import ShardIndexError, load_shard_set
from w2v_dist.data.loader import TrainStream, make_loader
from w2v_dist.data.plan import BatchPolicy, StreamLayout


def keys(batches: list[dict]) -> list[list[str]]:
    return [list(b.keys) for b in batches]


def train_stream_with(location: str, model_dir: Path, workers: int, policy: BatchPolicy) -> TrainStream:
    """``train_stream(location, model_dir, workers=workers)`` with another batch policy."""
    return TrainStream(load_shard_set(location), policy, preprocess(model_dir), rank=0, world_size=1,
                       layout=StreamLayout(1, max(1, workers), 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_key_sequence(shard_dirs: dict, tiny_model: Path,
                                                          workers: int) -> None:
    location = str(shard_dirs["train-clean-100"])
    straight = keys(take_batches(train_stream(location, tiny_model, workers=workers), workers, 40))
    for cut in (1, 7, 23):
        resumed = train_stream(location, tiny_model, workers=workers)
        resumed.load_state_dict({**resumed.state_dict(), "update": cut})
        assert keys(take_batches(resumed, workers, 40 - cut)) == straight[cut:], f"resume at {cut}"


def test_an_index_without_byte_ranges_streams_whole_shards_into_the_same_batches(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards made before byte ranges (3-element rows, no columns) give the batches of the same shards with
    them: each shard a slot needs is streamed whole, and no sample is read by its range."""
    import w2v_dist.data.loader as loader

    location = shard_dirs["train-clean-100"]
    ranged = [list(b.input_lengths) for b in take_batches(train_stream(str(location), tiny_model), 0, 12)]
    old = tmp_path / "old"
    shutil.copytree(location, old, ignore=shutil.ignore_patterns("index.columns"))
    index = json.loads((old / "index.json").read_text())
    for shard in index["shards"]:
        shard["utterances"] = [row[:3] for row in shard["utterances"]]
    (old / "index.json").write_text(json.dumps(index))

    def no_ranges(*args: object, **kwargs: object) -> None:
        raise AssertionError("a range read without byte ranges")

    monkeypatch.setattr(loader, "read_ranges", no_ranges)
    whole = [list(b.input_lengths) for b in take_batches(train_stream(str(old), tiny_model), 0, 12)]
    assert whole == ranged


def test_streams_are_endless_and_cross_epochs(shard_dirs: dict, tiny_model: Path) -> None:
    """2 ranks x 2 workers = 4 slots over fewer shards: each rank keeps producing past several epochs."""
    location = str(shard_dirs["train-clean-100"])
    total = load_shard_set(location).total_samples
    for rank in (0, 1):
        batches = take_batches(train_stream(location, tiny_model, rank=rank, world=2, workers=2), 2, 60)
        assert len(batches) == 60
        assert sum(len(b) for b in batches) > total  # past one epoch of the whole set on one rank


def test_resume_refuses_another_data_layout(shard_dirs: dict, tiny_model: Path) -> None:
    stream = train_stream(str(shard_dirs["train-clean-100"]), tiny_model, world=2)
    with pytest.raises(ValueError, match="cannot resume the data position exactly"):
        stream.load_state_dict({"update": 3, "streams": 4, "readers": 1, "seed": 1})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_dev_utterance_once_over_ranks(shard_dirs: dict, tiny_model: Path, world: int) -> None:
    location = str(shard_dirs["dev-clean"])
    seen = Counter()
    for rank in range(world):
        for batch in make_loader(eval_stream(location, tiny_model, rank, world), 0, 2):
            seen.update(batch.keys)
    index = json.loads((shard_dirs["dev-clean"] / "index.json").read_text())
    assert seen == Counter(u[0] for s in index["shards"] for u in s["utterances"])


@pytest.mark.parametrize("ranges", [True, False])
def test_shards_stream_from_a_loopback_http_server(shard_dirs: dict, tiny_model: Path, ranges: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """By HTTP Range requests; from a server that ignores them, by whole shards (said once, at the start)."""
    directory = shard_dirs["train-clean-100"]
    local = keys(take_batches(train_stream(str(directory), tiny_model), 0, 12))
    with http_server(directory, ranges=ranges) as url:
        stream = train_stream(url, tiny_model, workers=1)
        remote = take_batches(stream, 1, 12)
    assert keys(remote) == local and remote[0].input_values.shape[0] == len(local[0])
    assert stream.by_range == ranges
    assert ("does not support HTTP Range requests" in caplog.text) == (not ranges)


def test_a_batch_of_shards_written_longest_first_is_one_range_request(shard_dirs: dict, tiny_model: Path
                                                                      ) -> None:
    """``w2v-dist shard`` writes each shard longest first, as the plan cuts it: a batch's samples are
    adjacent, so each batch costs one request (and the start one more, to see that the server serves
    ranges)."""
    traffic = Traffic()
    with http_server(shard_dirs["train-clean-100"], traffic=traffic) as url:
        batches = take_batches(train_stream(url, tiny_model), 0, 12)
    tars = sum(count for path, count in traffic.requests.items() if path.endswith(".tar"))
    assert tars == len(batches) + 1 and sum(map(len, batches)) > 2 * len(batches)


def rewrite_tar(path: Path, change: dict[str, bytes | None]) -> None:
    """Replace (or with None, drop) members of a tar in place."""
    members = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name in change:
                if change[info.name] is None:
                    continue
                data = change[info.name]
                info.size = len(data)
            members.append((info, data))
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def damaged_shards(shard_dirs: dict, tmp_path: Path) -> tuple[Path, str, str]:
    out = tmp_path / "shards"
    shutil.copytree(shard_dirs["dev-clean"], out)
    index = json.loads((out / "index.json").read_text())
    first, second = index["shards"][0]["utterances"][0][0], index["shards"][0]["utterances"][1][0]
    rewrite_tar(out / index["shards"][0]["name"],
                {f"{first}.flac": b"garbage" * 100, f"{second}.json": None})
    return out, first, second


def test_bad_members_are_skipped_counted_and_named(damaged_shards: tuple, tiny_model: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    location, corrupt, missing = damaged_shards
    with caplog.at_level(logging.WARNING, logger="w2v_dist.data"):
        batches = list(make_loader(eval_stream(str(location), tiny_model, 0, 1), 0, 2))
    skips = Counter()
    for b in batches:
        skips.update(b.skips)
    delivered = {k for b in batches for k in b.keys}
    assert corrupt not in delivered and missing not in delivered
    assert skips["bad_audio"] == 1 and skips["missing_member"] == 1
    assert f"sample {corrupt} cannot be decoded" in caplog.text and "shard-000000.tar" in caplog.text


def test_truncated_shard_is_skipped_with_a_warning(shard_dirs: dict, tiny_model: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shard_dirs["dev-clean"], out)
    shard = out / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    index = json.loads((out / "index.json").read_text())
    with caplog.at_level(logging.WARNING, logger="w2v_dist.data"):
        batches = list(make_loader(eval_stream(str(out), tiny_model, 0, 1), 0, 2))
    delivered = sum(len(b) for b in batches)
    missing = sum(b.skips.get("missing_member", 0) for b in batches)
    assert missing > 0 and delivered + missing == index["totals"]["written"]
    assert "truncated or corrupt" in caplog.text


def test_missing_shard_fails_fast_with_its_url(shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shard_dirs["dev-clean"], out)
    (out / "shard-000000.tar").unlink()
    with pytest.raises(RuntimeError, match="shard-000000.tar"):
        list(make_loader(eval_stream(str(out), tiny_model, 0, 1), 0, 2))


@pytest.mark.parametrize("name", ["../escape.tar", "/etc/passwd", "pipe:rm -rf x", "http://evil/x.tar",
                                  "a/b.tar", ".."])
def test_index_shard_names_cannot_inject_paths_or_commands(shard_dirs: dict, tmp_path: Path,
                                                           name: str) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shard_dirs["dev-clean"], out)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["name"] = name
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match="refusing shard name"):
        load_shard_set(str(out))


def test_resume_property_over_worlds_workers_and_cut_points(shard_dirs: dict, tiny_model: Path) -> None:
    """Any rank of any world size, any worker count, any cut: the resumed stream continues the key
    sequence."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    location = str(shard_dirs["train-clean-100"])

    @settings(max_examples=8, deadline=None, database=None)
    @given(world=st.integers(1, 4), any_rank=st.integers(0, 3), workers=st.integers(0, 3),
           cut=st.integers(1, 12))
    # 12 slots, 4 shards (one of 2 utterances): none may be empty
    @example(world=4, any_rank=3, workers=3, cut=1)
    def check(world: int, any_rank: int, workers: int, cut: int) -> None:
        rank = any_rank % world
        straight = keys(take_batches(train_stream(location, tiny_model, rank, world, workers), workers,
                                     cut + 6))
        resumed = train_stream(location, tiny_model, rank, world, workers)
        resumed.load_state_dict({**resumed.state_dict(), "update": cut})
        assert keys(take_batches(resumed, workers, 6)) == straight[cut:]

    check()


def test_pipe_shard_command_from_the_users_config(shard_dirs: dict, tiny_model: Path) -> None:
    """`data.shard_command` (the user's own config, never the index) opens shards through a command."""
    location = str(shard_dirs["train-clean-100"])
    piped = load_shard_set(location, shard_command=f"pipe:cat {location}/{{shard}}")
    assert all(url.startswith("pipe:cat ") for url in piped.urls)
    stream = TrainStream(piped, POLICY, preprocess(tiny_model), rank=0, world_size=1,
                         layout=StreamLayout(1, 1, 1))
    assert keys(take_batches(stream, 0, 5)) == keys(take_batches(train_stream(location, tiny_model), 0, 5))


def test_speed_perturbed_batches_are_the_resampled_audio_at_the_planned_lengths(shard_dirs: dict,
                                                                                tiny_model: Path) -> None:
    """Workers decode, resample (torchaudio) and pad each utterance to the length the plan computed for its
    speed; a resumed stream draws the same speeds."""
    import io
    import tarfile
    from dataclasses import replace

    import numpy as np
    import soundfile as sf

    from w2v_dist.data.audio import speed_perturb

    location = str(shard_dirs["train-clean-100"])
    stream = train_stream_with(location, tiny_model, 1, replace(POLICY, speeds=(0.9, 1.1)))
    batches = take_batches(stream, 1, 12)
    planned = {u.key: u for batch in stream.plan.slot_epoch(0, 0)[0] for u in batch}  # slot 0's epoch 0
    audio = {}
    for tar in sorted(Path(location).glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".flac"):
                    audio[member.name[:-5]] = sf.read(io.BytesIO(archive.extractfile(member).read()),
                                                      dtype="float32")[0]
    checked = 0
    for batch in batches:
        for row, key, length in zip(batch.input_values, batch.keys, batch.input_lengths.tolist()):
            utt = planned.get(key)
            if utt is None:  # a later epoch's draw
                continue
            assert utt.speed in (0.9, 1.1) and length == utt.num_samples
            expected = speed_perturb(audio[key], utt.speed, 16_000)
            assert np.allclose(row[:length].numpy(), expected, atol=1e-6)
            assert not row[length:].any()
            checked += 1
    assert checked >= 8
    resumed = train_stream_with(location, tiny_model, 1, stream.policy)
    resumed.load_state_dict({**resumed.state_dict(), "update": 5})
    assert [list(b.input_lengths) for b in take_batches(resumed, 1, 4)] == \
        [list(b.input_lengths) for b in batches[5:9]]


@pytest.mark.parametrize("workers", [0, 2])
def test_grid_shapes_from_real_shards_with_empty_rows_and_exact_resume(shard_dirs: dict, tiny_model: Path,
                                                                       workers: int) -> None:
    """24 updates of a grid-shaped stream (data.shape_quantum_frames=32), in shared-memory buffers with 2
    workers: every batch has its grid shape (full or half rows), its empty rows are silence without labels,
    at most 12 shapes occur where free batches have many more, and a resume replays the same batches."""
    from dataclasses import replace

    from w2v_dist.data.audio import EncoderGeometry
    from w2v_dist.data.shapes import ShapeGrid

    location = str(shard_dirs["train-clean-100"])
    grid = ShapeGrid.for_encoder(32, EncoderGeometry(), 8 * 16_000, 4)

    def stream() -> TrainStream:
        return train_stream_with(location, tiny_model, workers, replace(POLICY, grid=grid))

    batches = take_batches(stream(), workers, 24)
    for batch in batches:
        rows, length = batch.input_values.shape
        full = grid.rows(grid.length(max(batch.sample_lengths)))
        half = -(-full // 2)  # a batch that fits in half its shape's rows has half of them (a halved batch)
        assert (rows, length) == (half if len(batch) <= half else full,
                                  grid.length(max(batch.sample_lengths)))
        assert len(batch) <= rows and batch.sample_lengths[len(batch):] == (0,) * (rows - len(batch))
        assert not batch.input_values[len(batch):].any() and batch.target_lengths[len(batch):] == (0,) * (
            rows - len(batch))
    shapes = {tuple(b.input_values.shape) for b in batches}
    free = {tuple(b.input_values.shape) for b in take_batches(train_stream(location, tiny_model,
                                                                           workers=workers),
                                                               workers, 24)}
    assert len(shapes) <= 12 < len(free), (len(shapes), len(free))
    assert any(len(b) < b.input_values.shape[0] for b in batches)  # the test meets empty rows
    resumed = stream()
    resumed.load_state_dict({**resumed.state_dict(), "update": 7})
    assert keys(take_batches(resumed, workers, 17)) == keys(batches)[7:]
