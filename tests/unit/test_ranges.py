"""Reading a sample's bytes, not its whole shard: the byte ranges the sharder records (or ``w2v-dist index``
adds to an older index) are exactly where the samples lie, and ``read_ranges`` fetches those bytes alone,
locally and over HTTP (with the retries of whole-shard reads), failing clearly when the ranges or the server
cannot be trusted."""

from __future__ import annotations

import builtins
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.support.data import Traffic, http_server
from w2v_dist.cli import main
from w2v_dist.data import ranges as range_reader
from w2v_dist.data.columns import COLUMNS_DIR
from w2v_dist.data.offsets import ShardOffsetsError, add_offsets, parse_sample, scan_offsets
from w2v_dist.data.ranges import read_ranges
from w2v_dist.data.shard_reader import RemoteShardError, RetryPolicy, read_members
from w2v_dist.prep.shards import ShardOptions, shard_corpus
from w2v_dist.prep.sources import Source

FAST = RetryPolicy(attempts=3, backoff_seconds=0.01)
LONG_KEY = "long-" + "k" * 120
"""A key whose member names need GNU long-name headers (``././@LongLink``)."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard directory written by ``shard_corpus``: two shards of 0.3 to 0.9 s of noise, one long key."""
    root = tmp_path_factory.mktemp("ranges")
    rng = np.random.default_rng(0)
    sources = []
    for i in range(16):
        path = root / f"u{i}.flac"
        audio = (0.05 * rng.standard_normal(int(16_000 * rng.uniform(0.3, 0.9)))).astype(np.float32)
        sf.write(path, audio, 16_000, format="FLAC", subtype="PCM_16")
        sources.append(Source(LONG_KEY if i == 5 else f"spk-{i:04d}", path, "HELLO WORLD"[: 3 + i % 8]))
    out = root / "shards"
    # In the shuffled order: the retries below are cut half way through a run, after its first sample.
    shard_corpus(sources, out, ShardOptions(shard_size_mb=0.12, workers=1, sort_in_shards=False), {})
    return out


def index_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "index.json").read_text())


def spans(directory: Path, shard: int = 0) -> list[tuple[str, int, int]]:
    return [(k, o, s) for k, _, _, o, s in index_of(directory)["shards"][shard]["utterances"]]


def test_the_sharder_records_each_samples_byte_range_as_the_tar_headers_place_it(shards: Path) -> None:
    index = index_of(shards)
    assert len(index["shards"]) >= 2 and (shards / COLUMNS_DIR).is_dir()
    for entry in index["shards"]:
        rows = entry["utterances"]
        assert all(len(row) == 5 for row in rows)
        assert scan_offsets(shards / entry["name"]) == {k: (o, s) for k, _, _, o, s in rows}
        # The samples tile the archive: each starts where the previous ended, from byte 0 to the trailer.
        ends = [0] + [o + s for _, _, _, o, s in rows]
        assert [o for _, _, _, o, _ in rows] == ends[:-1]
        assert entry["bytes"] - ends[-1] >= 2 * tarfile.BLOCKSIZE
    assert any(row[0] == LONG_KEY for entry in index["shards"] for row in entry["utterances"])


def test_index_adds_to_an_old_three_element_index_the_rows_the_sharder_writes(shards: Path,
                                                                                tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    shutil.rmtree(old / COLUMNS_DIR)
    index = index_of(old)
    for entry in index["shards"]:
        entry["utterances"] = [row[:3] for row in entry["utterances"]]
    (old / "index.json").write_text(json.dumps(index))
    done = add_offsets(old)
    assert index_of(old) == index_of(shards) and (old / COLUMNS_DIR).is_dir()
    assert (done.shards, done.scanned, done.utterances) == (len(index["shards"]), len(index["shards"]), 16)
    assert add_offsets(old).scanned == 0, "rows that have offsets are not scanned again"
    assert index_of(old) == index_of(shards)


def test_index_names_a_key_the_tar_does_not_hold(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    index = index_of(bad)
    index["shards"][1]["utterances"][0] = ["not-in-the-tar", 1, 1]
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardOffsetsError, match=r"shard-000001\.tar: index\.json lists 1 samples the tar "
                                                r"does not hold \(e\.g\. 'not-in-the-tar'\)"):
        add_offsets(bad)


def test_the_index_command_prints_a_line_per_directory_and_refuses_urls(
        shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(shards)]) == 0
    assert capsys.readouterr().out.startswith(f"{shards}: 2 shards (0 scanned for offsets), 16 utterances, ")
    assert main(["index", str(shards), "http://host/shards"]) == 2
    assert "http://host/shards: index rewrites local shard directories only" in capsys.readouterr().err


def requested(directory: Path) -> list[tuple[str, int, int]]:
    """Every other sample of shard 0 (runs with gaps) and the second one (joining the first and the third
    into one run), shuffled: read order is not request order. :func:`runs` counts the runs."""
    picked = spans(directory)[::2] + spans(directory)[1:2]
    random.Random(0).shuffle(picked)
    return picked


def runs(directory: Path) -> int:
    return len(spans(directory)[::2]) - 1


def whole_shard_reads(url: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    return dict(read_members(url, keys, Counter()))


class CountingFile(io.RawIOBase):
    """A file that counts the bytes read through it and its seeks."""

    def __init__(self, path: str, mode: str, buffering: int = -1) -> None:
        self.raw, self.bytes, self.seeks = builtins.open(path, mode, buffering=buffering), 0, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.seeks += 1
        return int(self.raw.seek(offset, whence))

    def close(self) -> None:
        self.raw.close()
        super().close()


def test_local_ranges_give_what_a_whole_shard_read_gives_reading_only_their_bytes(
        shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar, ranges = str(shards / "shard-000000.tar"), requested(shards)
    expected = whole_shard_reads(tar, {k for k, _, _ in ranges})
    opened: list[CountingFile] = []

    def counting_open(path: str, mode: str, buffering: int = -1) -> CountingFile:
        opened.append(CountingFile(path, mode, buffering))
        return opened[-1]

    monkeypatch.setattr(range_reader, "open", counting_open, raising=False)
    skips: Counter[str] = Counter()
    got = list(read_ranges(tar, ranges, skips))
    assert got == [(k, expected[k]) for k, _, _ in ranges] and not skips
    assert len(opened) == 1 and opened[0].bytes == sum(s for _, _, s in ranges)
    assert opened[0].seeks == runs(shards), "one seek per run of adjacent samples"
    assert set(got[0][1]) == {"flac", "json"} and sf.read(io.BytesIO(got[0][1]["flac"]))[1] == 16_000


@pytest.mark.parametrize("drops", [0, 2])
def test_http_ranges_fetch_only_their_bytes_and_retry_cut_transfers(shards: Path, drops: int) -> None:
    ranges, path = requested(shards), "/shard-000000.tar"
    expected = whole_shard_reads(str(shards / "shard-000000.tar"), {k for k, _, _ in ranges})
    traffic, skips = Traffic(), Counter[str]()
    with http_server(shards, drops=drops, traffic=traffic) as url:
        got = list(read_ranges(f"{url}{path}", ranges, skips, FAST))
    assert got == [(k, expected[k]) for k, _, _ in ranges], "every sample once, in the order asked"
    assert skips["shard_retries"] == drops
    assert traffic.requests[path] == runs(shards) + drops, "one request per run, and one per retry"
    starts = [int(asked.removeprefix("bytes=").split("-")[0]) for asked in traffic.ranges[path]]
    if drops:  # each cut came after the run's first sample: the retry resumes past the samples delivered
        assert starts[0] < starts[1] < starts[2]
    else:
        assert traffic.sent[path] == sum(s for _, _, s in ranges)


def test_a_server_that_ignores_range_fails_at_once_saying_so(shards: Path) -> None:
    skips: Counter[str] = Counter()
    with http_server(shards, ranges=False) as url:
        with pytest.raises(RemoteShardError, match=r"shard http://127\.0\.0\.1:\d+/shard-000000\.tar: the "
                                                   r"server does not support HTTP Range requests"):
            list(read_ranges(f"{url}/shard-000000.tar", spans(shards)[2:4], skips, FAST))
    assert not skips


def test_a_shard_that_keeps_failing_stops_naming_it(shards: Path) -> None:
    with http_server(shards, drops=100) as url:
        with pytest.raises(RemoteShardError, match=r"shard-000000\.tar failed 3 times, last: curl exited"):
            list(read_ranges(f"{url}/shard-000000.tar", spans(shards)[:3], Counter(), FAST))


@pytest.mark.parametrize("shift,size_change", [(512, 0), (-512, 0), (0, -512), (0, 512), ("swap", 0)])
def test_offsets_that_do_not_match_the_shard_name_it_and_the_fix(shards: Path, shift: int | str,
                                                                 size_change: int) -> None:
    rows = spans(shards)[1:4]
    if shift == "swap":
        wrong = [(rows[0][0], rows[1][1], rows[1][2]), (rows[1][0], rows[0][1], rows[0][2])]
    else:
        wrong = [(k, o + int(shift), s + size_change) for k, o, s in rows]
    with pytest.raises(ShardOffsetsError, match=r"shard .*shard-000000\.tar: the bytes index\.json gives "
                                                r"for sample .* run 'w2v-dist index DIR'"):
        list(read_ranges(str(shards / "shard-000000.tar"), wrong, Counter()))


def test_streams_that_cannot_seek_and_rows_without_offsets_read_the_whole_shard(shards: Path) -> None:
    tar, ranges = shards / "shard-000000.tar", requested(shards)
    expected = [(k, m) for k, m in read_ranges(str(tar), ranges, Counter())]
    assert list(read_ranges(f"pipe:cat {tar}", ranges, Counter())) == expected
    assert list(read_ranges(str(tar), [(k, -1, 0) for k, _, _ in ranges], Counter())) == expected


def test_a_local_shard_shorter_than_its_ranges_ends_with_a_warning(shards: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    rows = spans(shards)
    cut = tmp_path / "shard-000000.tar"
    cut.write_bytes((shards / "shard-000000.tar").read_bytes()[: rows[2][1] + 700])
    skips: Counter[str] = Counter()
    got = [k for k, _ in read_ranges(str(cut), rows[:4], skips)]
    assert got == [rows[0][0], rows[1][0]] and skips == Counter(truncated_shard=1)
    assert "is truncated or corrupt" in caplog.text


def test_pax_and_gnu_long_names_are_read_as_tarfile_writes_them(tmp_path: Path) -> None:
    for form in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{form}.tar"
        keys = ["short", "é-" + "x" * 150, "plain"]
        with tarfile.open(path, "w", format=form) as tar:
            for key in keys:
                for ext, data in (("flac", key.encode() * 300), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        found = scan_offsets(path)
        assert list(found) == keys
        raw = path.read_bytes()
        for key, (offset, size) in found.items():
            assert parse_sample(raw[offset:offset + size], key, str(path)) == {"flac": key.encode() * 300,
                                                                              "json": b"{}"}


def test_verify_checks_the_byte_ranges_training_reads(shards: Path, tmp_path: Path) -> None:
    from w2v_dist.prep.verify import verify_dir

    assert verify_dir(shards, workers=1).ok
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["shards"][0]["utterances"][2][3] += 512
    (copy / "index.json").write_text(json.dumps(index))
    result = verify_dir(copy, workers=1)
    assert not result.ok and "byte ranges of 1 samples differ from the tar" in result.shards[0].line()
