"""Where each sample lies in its shard: the byte ranges ``index.json`` records, so that a reader fetches a
sample's bytes (a seek, an HTTP Range request) instead of streaming its whole shard.

An index row is ``[key, num_samples, label_length, byte_offset, byte_size]``: ``byte_offset`` is where the
sample's first member header starts in the tar, ``byte_size`` runs from there through its last member's data
and the padding to a whole 512-byte block. Shards written before offsets existed have 3-element rows:
:func:`row_span` reads them as ``(-1, 0)``, and :func:`add_offsets` (``w2v-dist index``) fills them in from
the tar's headers without reading or rewriting audio.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from w2v_dist.data.columns import write_columns
from w2v_dist.data.index import FORMAT_VERSION, INDEX_NAME, ShardIndexError, check_shard_name

BLOCK = tarfile.BLOCKSIZE
NO_SPAN = (-1, 0)
"""What a row without offsets (an index from before them) reads as."""


class ShardOffsetsError(ValueError):
    """An index whose byte offsets do not describe its shard (or a shard that does not hold what its index
    lists)."""


def row_span(row: Sequence[Any]) -> tuple[int, int]:
    """``(byte_offset, byte_size)`` of an index row; :data:`NO_SPAN` for a 3-element row."""
    return (int(row[3]), int(row[4])) if len(row) >= 5 else NO_SPAN


def _padded_end(data_offset: int, size: int) -> int:
    return data_offset + size + (-size % BLOCK)


def scan_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Per sample key, ``(byte_offset, byte_size)`` in the tar at ``path``, from its headers alone
    (``tarfile`` seeks past every member's data). A sample's members must be consecutive, as the sharder
    writes them and as WebDataset groups them."""
    spans: dict[str, list[int]] = {}
    last = ""
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, end = member.name.partition(".")[0], _padded_end(member.offset_data, member.size)
                if key == last:
                    spans[key][1] = end
                elif key in spans:
                    raise ShardOffsetsError(f"{path}: the members of sample {key!r} are not consecutive, so "
                                            f"it has no single byte range")
                else:
                    spans[key], last = [member.offset, end], key
    except tarfile.TarError as err:
        raise ShardOffsetsError(f"{path}: unreadable tar ({err}); 'w2v-dist verify' says more") from None
    return {key: (start, end - start) for key, (start, end) in spans.items()}


def _mismatch(shard: str, key: str, what: str) -> ShardOffsetsError:
    return ShardOffsetsError(f"shard {shard}: the bytes index.json gives for sample {key!r} {what}: the "
                             f"index's offsets do not match the shard (was it rewritten?); run "
                             f"'w2v-dist index DIR' on the shard directory to record them again")


def _pax_path(records: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<length> path=<name>\\n"`` records)."""
    pos = 0
    while pos < len(records):
        length = int(records[pos:records.index(b" ", pos)])
        field, _, value = records[records.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if field == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def parse_sample(data: bytes, key: str, shard: str) -> dict[str, bytes]:
    """``{ext: bytes}`` of the members of one sample, ``data`` being exactly its byte range. GNU long names
    (``././@LongLink``) and pax ``path`` records name the member that follows them. Anything but whole
    members of ``key`` filling the range raises :class:`ShardOffsetsError` naming ``shard``."""
    members: dict[str, bytes] = {}
    pos, long_name = 0, None
    while pos < len(data):
        try:
            info = tarfile.TarInfo.frombuf(data[pos:pos + BLOCK], "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise _mismatch(shard, key, f"hold no tar header at byte {pos} ({err})") from None
        start = pos + BLOCK
        payload, pos = data[start:start + info.size], _padded_end(start, info.size)
        if pos > len(data):
            raise _mismatch(shard, key, f"end inside member {info.name!r}")
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            try:
                long_name = _pax_path(payload) or long_name
            except ValueError:
                raise _mismatch(shard, key, "hold a malformed pax header") from None
        elif info.isreg():
            name, long_name = long_name or info.name, None
            prefix, _, ext = name.partition(".")
            if prefix != key:
                raise _mismatch(shard, key, f"hold member {name!r}")
            members[ext] = payload
    if not members:
        raise _mismatch(shard, key, "hold no member")
    return members


@dataclass(frozen=True)
class Indexed:
    """What ``w2v-dist index`` did to one shard directory."""

    shards: int
    utterances: int
    scanned: int
    """Shards whose rows had no offsets, now filled in from their headers."""


def save_index(directory: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` atomically (a reader sees the old one or the new one, never half of one), then
    its columnar copy beside it. The one writer of an index, for ``w2v-dist shard`` and ``w2v-dist index``
    alike."""
    tmp = directory / (INDEX_NAME + ".partial")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.rename(directory / INDEX_NAME)
    write_columns(directory, index)


def add_offsets(directory: Path) -> Indexed:
    """Fill in the byte offsets of the rows of a local shard directory's index that lack them (scanning only
    those shards' headers), then write ``index.json`` and its columnar copy again. A key the tar does not
    hold fails, naming it: the index and the shard disagree."""
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardIndexError(f"no {INDEX_NAME} in {directory}: run 'w2v-dist shard' to create shards"
                              ) from None
    except json.JSONDecodeError as err:
        raise ShardIndexError(f"{path} is not valid JSON: {err}") from None
    if index.get("version") != FORMAT_VERSION or not isinstance(index.get("shards"), list):
        raise ShardIndexError(f"{path}: not a version {FORMAT_VERSION} index with a list of shards")
    scanned = 0
    for entry in index["shards"]:
        rows = entry["utterances"]
        if all(row_span(row) != NO_SPAN for row in rows):
            continue
        tar = directory / check_shard_name(entry.get("name"), str(directory))
        spans = scan_offsets(tar)
        if missing := [row[0] for row in rows if row[0] not in spans]:
            raise ShardOffsetsError(f"{tar}: index.json lists {len(missing)} samples the tar does not hold "
                                    f"(e.g. {missing[0]!r}); the index and the shard disagree: restore the "
                                    f"shard or shard the corpus again")
        entry["utterances"] = [[*row[:3], *spans[row[0]]] for row in rows]
        scanned += 1
    save_index(directory, index)
    return Indexed(len(index["shards"]), sum(len(e["utterances"]) for e in index["shards"]), scanned)
