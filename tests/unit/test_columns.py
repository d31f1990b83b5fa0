"""The columnar shard index: what ``index.columns/`` loads is what ``index.json`` says, shard by shard."""

from __future__ import annotations

import functools
import http.server
import json
import os
import pickle
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from w2v_dist.data.columns import COLUMNS_DIR, read_columns, write_columns
from w2v_dist.data.index import ShardIndexError, ShardSet, Utterance, load_shard_set
from w2v_dist.data.mix import mix_shard_sets
from w2v_dist.preflight import worst_case

SR = 16_000


def index_body(sizes: list[int], width: int = 3, tag: str = "k") -> dict[str, Any]:
    """An index.json body; ``width`` 3 or 5 (rows with byte ranges), 4 for rows alternating them."""
    shards = []
    for s, size in enumerate(sizes):
        rows = [[f"{tag}{s}-{p}" + ("é" if p == 1 else ""),  # a non-ASCII key: keys are UTF-8 bytes
                 SR * (1 + (s * 7 + p * 3) % 11), 5 + (s + p) % 9] for p in range(size)]
        rows = [[*row, 1024 * p, 3072 + 512 * s] if width == 5 or (width == 4 and (s + p) % 2) else row
                for p, row in enumerate(rows)]
        shards.append({"name": f"shard-{s:06d}.tar", "samples": size, "utterances": rows})
    return {"format": "w2v-dist-shards", "version": 1, "sample_rate": SR, "shards": shards,
            "text_policy": {"case": "lower"}}


def write_index(directory: Path, index: dict[str, Any], columns: bool = True) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    if columns:
        write_columns(directory, index)
    return str(directory)


def memory_mapped(shards: ShardSet) -> bool:
    return isinstance(shards.columns.num_samples, np.memmap)


def assert_same(a: ShardSet, b: ShardSet) -> None:
    assert (a.urls, a.seconds, a.sample_rate) == (b.urls, b.seconds, b.sample_rate)
    assert a.text_policy == b.text_policy
    assert len(a.utterances) == len(b.utterances)
    assert all(x == y for x, y in zip(a.utterances, b.utterances))
    assert a.columns == b.columns and a.contents_digest == b.contents_digest


@pytest.mark.parametrize("width", [3, 5, 4])
def test_the_columns_load_what_index_json_says(tmp_path: Path, width: int) -> None:
    index = index_body([4, 1, 6, 3], width)
    location = write_index(tmp_path, index, columns=False)
    parsed = load_shard_set(location)
    write_columns(tmp_path, index)
    mapped = load_shard_set(location)
    assert memory_mapped(mapped) and not memory_mapped(parsed)
    assert_same(mapped, parsed)
    expected = [[Utterance(s, p, row[0], row[1], row[2]) for p, row in enumerate(shard["utterances"])]
                for s, shard in enumerate(index["shards"])]
    assert [list(shard) for shard in mapped.utterances] == expected
    assert mapped.total_samples == 14 and mapped.seconds[2] == sum(u.num_samples for u in expected[2]) / SR
    assert mapped.text_policy.case == "lower"
    spans = [(row[3], row[4]) if len(row) == 5 else (-1, 0) for shard in index["shards"]
             for row in shard["utterances"]]
    assert list(zip(mapped.columns.byte_offset.tolist(), mapped.columns.byte_size.tolist())) == spans
    assert mapped.columns.has_offsets == (width == 5)


def test_rows_of_another_width_are_refused(tmp_path: Path) -> None:
    index = index_body([2])
    index["shards"][0]["utterances"][1].append(99)
    with pytest.raises(ShardIndexError, match="a row has 4 fields"):
        load_shard_set(write_index(tmp_path, index, columns=False))


@pytest.mark.parametrize("max_samples", [1, 4, 6, 13, 14, 99])
def test_max_samples_keeps_the_first_utterances_in_index_order(tmp_path: Path, max_samples: int) -> None:
    index = index_body([4, 1, 6, 3])
    location = write_index(tmp_path, index, columns=False)
    parsed = load_shard_set(location, max_samples=max_samples)
    write_columns(tmp_path, index)
    mapped = load_shard_set(location, max_samples=max_samples)
    assert memory_mapped(mapped)
    assert_same(mapped, parsed)
    keys = [row[0] for shard in index["shards"] for row in shard["utterances"]][:max_samples]
    assert [u.key for shard in mapped.utterances for u in shard] == keys


def test_stale_columns_are_ignored_with_a_warning_naming_the_fix(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    index = index_body([3, 2])
    location = write_index(tmp_path, index)
    index["shards"][1]["utterances"][0][2] += 1  # same size, another label length
    text = json.dumps(index, indent=1) + "\n"
    (tmp_path / "index.json").write_text(text)
    os.utime(tmp_path / "index.json", ns=(1, 1))
    shards = load_shard_set(location)
    assert not memory_mapped(shards) and shards.utterances[1][0].label_length == index_body([3, 2])[
        "shards"][1]["utterances"][0][2] + 1
    assert "changed since they were written" in caplog.text and f"w2v-dist index {location}" in caplog.text
    caplog.clear()
    index["shards"][0]["utterances"].pop()
    write_index(tmp_path, index, columns=False)
    assert load_shard_set(location).total_samples == 4 and "bytes, not" in caplog.text
    assert read_columns(location) is None


def test_a_copy_without_its_times_still_reads_the_columns(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    original = write_index(tmp_path / "a", index_body([3, 2]))
    copy = tmp_path / "b"
    shutil.copytree(original, copy, copy_function=shutil.copyfile)  # new mtimes, same bytes
    assert (copy / "index.json").stat().st_mtime_ns != (tmp_path / "a" / "index.json").stat().st_mtime_ns
    shards = load_shard_set(str(copy))
    assert memory_mapped(shards) and not caplog.text
    assert shards.urls[0] == str(copy / "shard-000000.tar")


def test_a_mix_numbers_each_part_s_shards_after_those_before_it(tmp_path: Path) -> None:
    a = load_shard_set(write_index(tmp_path / "a", index_body([4, 1, 6], tag="a")))
    b = load_shard_set(write_index(tmp_path / "b", index_body([2, 5], 5, tag="b")))
    mix = mix_shard_sets({"a": a, "b": b}, {"a": 1.0, "b": 0.5})
    assert len(mix.utterances) == 5 and mix.total_samples == 18 and mix.shard_parts == (0, 0, 0, 1, 1)
    for j in range(2):
        assert mix.utterances[3 + j] == tuple(replace(u, shard=3 + j) for u in b.utterances[j])
        assert mix.columns.byte_offset[mix.columns.shard_rows(3 + j)].tolist() == \
            b.columns.byte_offset[b.columns.shard_rows(j)].tolist()
    assert mix.utterances[2] == a.utterances[2] and mix.seconds == a.seconds + b.seconds
    assert not mix.columns.has_offsets and b.columns.has_offsets


def test_utterances_is_a_lazy_view_of_the_columns(tmp_path: Path) -> None:
    shards = load_shard_set(write_index(tmp_path, index_body([2] * 20)))
    view = shards.utterances
    assert len(view) == 20 and view[-1] == view[19] and view[3:5] == (view[3], view[4])
    assert [u.position for u in view[7]] == [0, 1] and {u.shard for u in view[7]} == {7}
    with pytest.raises(IndexError):
        view[20]
    assert sum(1 for _ in view) == 20
    assert view._shard.cache_info().currsize <= 8  # a bounded cache, not one object per utterance
    assert pickle.loads(pickle.dumps(shards)).utterances[5] == view[5]


def test_a_set_built_in_memory_from_utterances_equals_the_loaded_one(tmp_path: Path) -> None:
    """Tests and tools build small sets from ``Utterance`` tuples (converted by ``columns_of``)."""
    loaded = load_shard_set(write_index(tmp_path, index_body([3, 2])))
    built = ShardSet(loaded.location, loaded.urls, loaded.seconds, tuple(loaded.utterances),  # type: ignore
                     SR, loaded.text_policy)
    unplaced = replace(loaded.columns, byte_offset=np.full(5, -1), byte_size=np.zeros(5, np.int64))
    assert built.columns == unplaced and built.contents_digest == loaded.contents_digest
    misnumbered = (loaded.utterances[0], tuple(replace(u, shard=0) for u in loaded.utterances[1]))
    with pytest.raises(ValueError, match="not numbered"):
        ShardSet("mem", loaded.urls, loaded.seconds, misnumbered, SR)  # type: ignore[arg-type]


def test_the_digest_follows_names_keys_and_lengths_but_not_offsets(tmp_path: Path) -> None:
    def digest(edit: Any = None, columns: bool = True) -> str:
        index = index_body([3, 2], 5)
        if edit:
            edit(index["shards"][1])
        name = f"d{len(list(tmp_path.iterdir()))}"
        return load_shard_set(write_index(tmp_path / name, index, columns)).contents_digest

    same = digest()
    assert digest(columns=False) == same
    assert digest(lambda shard: shard["utterances"][1].__setitem__(3, 7)) == same
    assert digest(lambda shard: shard["utterances"][1].__setitem__(2, 99)) != same
    assert digest(lambda shard: shard["utterances"][1].__setitem__(1, 99)) != same
    assert digest(lambda shard: shard["utterances"][1].__setitem__(0, "other")) != same
    assert digest(lambda shard: shard.__setitem__("name", "renamed.tar")) != same


def test_worst_case_reads_the_columns(tmp_path: Path) -> None:
    from w2v_dist.data.audio import EncoderGeometry
    from w2v_dist.data.plan import BatchPolicy
    from w2v_dist.data.preprocess import Preprocess

    shards = load_shard_set(write_index(tmp_path, index_body([4, 1, 6])))
    prep = Preprocess(labels=None, collator=None, geometry=EncoderGeometry(),  # type: ignore[arg-type]
                      min_samples=0, max_samples=10 * SR)
    case = worst_case(shards, BatchPolicy(40 * SR, 8, 8, 1), prep)
    kept = shards.columns.num_samples[shards.columns.num_samples <= 10 * SR]
    assert (case.batch_size, case.num_samples) == (4, int(kept.max()))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``tmp_path / "srv"`` served over HTTP on 127.0.0.1."""
    root = tmp_path / "srv"
    root.mkdir()
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_columns_are_downloaded_and_checked_against_index_json(
        served: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    root, url = served
    index = index_body([3, 2], 5)
    write_index(root, index)
    remote = load_shard_set(url)
    assert not memory_mapped(remote) and remote.columns == load_shard_set(str(root)).columns
    assert remote.urls[1] == f"{url}/shard-000001.tar" and not caplog.text
    index["shards"][0]["utterances"].pop()
    write_index(root, index, columns=False)
    assert load_shard_set(url).total_samples == 4 and "bytes, not" in caplog.text


def test_columns_without_an_index_json_are_not_trusted(tmp_path: Path) -> None:
    location = write_index(tmp_path, index_body([2]))
    (tmp_path / "index.json").unlink()
    assert (tmp_path / COLUMNS_DIR / "meta.json").exists() and read_columns(location) is None
    with pytest.raises(ShardIndexError, match="no index.json"):
        load_shard_set(location)
