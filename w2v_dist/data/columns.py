"""The shard index as a few numpy columns instead of one Python object per utterance.

At 10,000 h (2.9 M utterances) a rank held ~206 B of objects per utterance and parsed index.json at every
start. Columns hold ~43 B per utterance, and ``index.columns/`` (one ``.npy`` per column, beside index.json)
is memory-mapped: the ranks and forked workers of a node share one copy in the page cache, and a load reads
headers only. Row ``i`` of every column is one utterance; shard ``j``'s rows are
``shard_starts[j]:shard_starts[j + 1]``, in tar order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2v_dist.redact import redact

log = logging.getLogger(__name__)
INDEX_NAME = "index.json"
COLUMNS_DIR = "index.columns"
COLUMNS_VERSION = 1
_DTYPES = {"shard_starts": np.int64, "num_samples": np.int32, "label_length": np.int32,
           "byte_offset": np.int64, "byte_size": np.int64, "key_blob": np.uint8, "key_starts": np.int64}
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True, eq=False)
class Columns:
    """Per utterance: lengths, key and where it lies in its tar (``-1`` / ``0`` where not recorded)."""

    shard_starts: np.ndarray
    num_samples: np.ndarray
    label_length: np.ndarray
    byte_offset: np.ndarray
    byte_size: np.ndarray
    key_blob: np.ndarray
    """Every key's UTF-8 bytes, one after the other: one array instead of millions of ``str`` objects."""
    key_starts: np.ndarray

    def __post_init__(self) -> None:
        """Columns may come from a file: a wrong type or length would otherwise show up as another
        utterance's key or length."""
        for name, dtype in _DTYPES.items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != dtype:
                raise ValueError(f"column {name} must be a 1-d {np.dtype(dtype)} array")
        rows, starts = len(self.num_samples), self.shard_starts
        if (len(starts) == 0 or starts[0] != 0 or starts[-1] != rows or bool(np.any(np.diff(starts) < 0))
                or len(self.key_starts) != rows + 1 or self.key_starts[0] != 0
                or self.key_starts[-1] != len(self.key_blob)
                or {len(self.label_length), len(self.byte_offset), len(self.byte_size)} != {rows}):
            raise ValueError("the columns' lengths disagree")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Columns) and all(np.array_equal(getattr(self, name), getattr(other, name))
                                                  for name in _DTYPES)

    def __hash__(self) -> int:
        return hash((self.rows, self.shards))

    @property
    def rows(self) -> int:
        """The number of utterances."""
        return len(self.num_samples)

    @property
    def shards(self) -> int:
        return len(self.shard_starts) - 1

    @property
    def has_offsets(self) -> bool:
        """Every row says where its bytes are (a reader may seek to them)."""
        return bool(np.all(self.byte_offset >= 0))

    def shard_rows(self, shard: int) -> range:
        if not 0 <= shard < self.shards:
            raise IndexError(f"shard {shard} of {self.shards}")
        return range(int(self.shard_starts[shard]), int(self.shard_starts[shard + 1]))

    def key(self, row: int) -> str:
        return self.key_blob[self.key_starts[row]:self.key_starts[row + 1]].tobytes().decode()

    def keys(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        picked = np.asarray(rows, dtype=np.int64)
        starts, ends = self.key_starts[picked].tolist(), self.key_starts[picked + 1].tolist()
        return [self.key_blob[start:end].tobytes().decode() for start, end in zip(starts, ends)]

    def head(self, max_samples: int) -> Columns:
        """The first ``max_samples`` rows in index order (all for 0); a shard left empty ends the set."""
        if max_samples <= 0 or max_samples >= self.rows:
            return self
        starts = np.minimum(self.shard_starts, max_samples)
        empty = np.flatnonzero(np.diff(starts) == 0)
        shards = int(empty[0]) if len(empty) else self.shards
        rows = int(starts[shards])
        return Columns(starts[:shards + 1].copy(), self.num_samples[:rows], self.label_length[:rows],
                       self.byte_offset[:rows], self.byte_size[:rows],
                       self.key_blob[:int(self.key_starts[rows])], self.key_starts[:rows + 1])

    @classmethod
    def concat(cls, parts: Sequence[Columns]) -> Columns:
        """The parts' shards one after the other (a mix): a part's shard ``j`` becomes ``offset + j``."""
        joined = {name: np.concatenate([getattr(part, name) for part in parts]) for name in _DTYPES}
        for starts, ends in (("shard_starts", "num_samples"), ("key_starts", "key_blob")):  # rebase
            shifts = np.cumsum([0, *(len(getattr(part, ends)) for part in parts)])
            joined[starts] = np.concatenate([[0], *(getattr(part, starts)[1:] + shift
                                                    for part, shift in zip(parts, shifts))])
        return cls(**joined)

    @classmethod
    def from_index(cls, index: dict[str, Any], max_samples: int = 0) -> Columns:
        """The columns of an ``index.json`` body, whose rows are ``[key, num_samples, label_length]`` or
        ``[..., byte_offset, byte_size]``. With ``max_samples``, the first N rows in index order; a shard
        left empty ends the set (its shard numbers stay those of the index)."""
        keys: list[str] = []
        samples: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        sizes = [0]
        remaining = max_samples or -1
        for number, entry in enumerate(index["shards"]):
            rows = entry["utterances"]
            if remaining >= 0:
                rows = rows[:remaining]
                remaining -= len(rows)
            if not rows:
                break
            widths = set(map(len, rows))
            if not widths <= {3, 5}:
                raise ValueError(f"shard {number}: a row has {(widths - {3, 5}).pop()} fields, expected "
                                 "[key, num_samples, label_length] or [..., byte_offset, byte_size]")
            if widths == {3, 5}:
                rows = [row if len(row) == 5 else [*row, -1, 0] for row in rows]
            key, shard_samples, shard_labels, *span = zip(*rows)
            if span:
                spans.append((len(keys), span[0], span[1]))
            keys += key
            samples += shard_samples
            labels += shard_labels
            sizes.append(len(rows))
        offsets, lengths = np.full(len(keys), -1, dtype=np.int64), np.zeros(len(keys), dtype=np.int64)
        for start, shard_offsets, shard_lengths in spans:
            offsets[start:start + len(shard_offsets)] = shard_offsets
            lengths[start:start + len(shard_offsets)] = shard_lengths
        numbers = {"num_samples": np.array(samples, np.int64), "label_length": np.array(labels, np.int64)}
        for name, values in numbers.items():
            if len(values) and (values.min() < 0 or values.max() > _INT32.max):
                raise ValueError(f"a {name} of {values.min()} or {values.max()} is out of range")
        return cls(np.cumsum(sizes, dtype=np.int64), numbers["num_samples"].astype(np.int32),
                   numbers["label_length"].astype(np.int32), offsets, lengths, *_key_columns(keys))


def _key_columns(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``key_blob`` and ``key_starts`` of ``keys``, encoding them in one call when they are ASCII."""
    try:
        text = "".join(keys)
    except TypeError:  # keys written as numbers
        keys = list(map(str, keys))
        text = "".join(keys)
    blob = text.encode()
    encoded = keys if len(blob) == len(text) else [key.encode() for key in keys]  # ASCII: 1 B a char
    starts = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(keys)), out=starts[1:])
    return np.frombuffer(blob, dtype=np.uint8), starts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_columns(directory: Path, index: dict[str, Any]) -> Path:
    """Write the columnar index of ``index`` (the dict of directory/index.json) beside it; returns its path.

    ``meta.json`` holds what loading needs from index.json (all but the shards' rows; the shard names), so
    that it is never parsed, and its size, mtime and sha256 to tell when it changed. Written to a temporary
    directory and renamed: a reader sees the old columns, the new ones or none."""
    columns = Columns.from_index(index)
    source = directory / INDEX_NAME
    stat = source.stat()
    meta = {"columns_version": COLUMNS_VERSION, "index_bytes": stat.st_size,
            "index_mtime_ns": stat.st_mtime_ns, "index_sha256": _sha256(source),
            "header": {k: v for k, v in index.items() if k != "shards"},
            "shard_names": [entry.get("name") for entry in index["shards"]]}
    target, tmp = directory / COLUMNS_DIR, directory / f".{COLUMNS_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in _DTYPES:
        np.save(tmp / f"{name}.npy", getattr(columns, name))
    (tmp / "meta.json").write_text(json.dumps(meta))
    if target.exists():  # a directory cannot be renamed over another: move the old one aside first
        old = directory / f".{COLUMNS_DIR}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def _fetch(url: str) -> bytes:
    import webdataset as wds  # lazily, as index.read_index_json does

    with wds.gopen(url, "rb") as stream:
        return stream.read()


def _remote_size(url: str) -> int | None:
    """``Content-Length`` of a HEAD request: the size of a remote index.json without downloading it."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as response:
            length = response.headers.get("Content-Length")
    except (OSError, ValueError):
        return None
    return int(length) if length is not None else None


def _stale(location: str, meta: dict[str, Any]) -> str | None:
    """Why the columns do not describe the ``index.json`` beside them, or ``None`` when they do."""
    if meta.get("columns_version") != COLUMNS_VERSION:
        return f"they are format {meta.get('columns_version')!r}, this version reads {COLUMNS_VERSION}"
    expected = meta.get("index_bytes")
    if _is_http(location):
        size = _remote_size(f"{location.rstrip('/')}/{INDEX_NAME}")
        return None if size == expected else f"{INDEX_NAME} has {size} bytes, not {expected}"
    source = Path(location) / INDEX_NAME
    try:
        stat = source.stat()
    except OSError as err:
        return f"{INDEX_NAME} cannot be read ({err.strerror})"
    if stat.st_size != expected:
        return f"{INDEX_NAME} has {stat.st_size} bytes, not {expected}"
    if stat.st_mtime_ns == meta.get("index_mtime_ns") or _sha256(source) == meta.get("index_sha256"):
        return None  # untouched, or copied without its times: hashing takes ~1 s a GB, parsing far longer
    return f"{INDEX_NAME} changed since they were written"


def _is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def read_columns_with_meta(location: str) -> tuple[Columns, dict[str, Any]] | None:
    """:func:`read_columns` and the ``meta.json`` beside the columns (``header``: index.json less its shards;
    ``shard_names``)."""
    remote = _is_http(location)
    if not remote and ("://" in location or location.startswith("pipe:")):
        return None  # other schemes and commands: only index.json
    folder = f"{location.rstrip('/')}/{COLUMNS_DIR}" if remote else str(Path(location) / COLUMNS_DIR)
    fix = f"run 'w2v-dist index {redact(location)}' to rewrite them"
    try:
        meta = json.loads(_fetch(f"{folder}/meta.json") if remote else Path(folder, "meta.json").read_text())
    except FileNotFoundError:  # shards from before columns: index.json holds it all
        return None
    except Exception as err:  # remote: also what a missing file looks like
        (log.debug if remote else log.warning)("%s: no readable %s/meta.json (%s): parsing %s instead",
                                               redact(location), COLUMNS_DIR, redact(str(err)), INDEX_NAME)
        return None
    if reason := _stale(location, meta if isinstance(meta, dict) else {}):
        log.warning("%s: ignoring %s (%s): parsing %s instead, which is slow for large corpora; %s",
                    redact(location), COLUMNS_DIR, reason, INDEX_NAME, fix)
        return None
    try:
        arrays = {name: np.load(io.BytesIO(_fetch(f"{folder}/{name}.npy"))) if remote
                  else np.load(Path(folder, f"{name}.npy"), mmap_mode="r") for name in _DTYPES}
        return Columns(**arrays), meta
    except Exception as err:  # a damaged or half-copied directory: index.json still holds it all
        log.warning("%s: cannot read %s (%s): parsing %s instead; %s", redact(location), COLUMNS_DIR,
                    redact(str(err)), INDEX_NAME, fix)
        return None


def read_columns(location: str) -> Columns | None:
    """The columnar index beside location's index.json when present and current (else None): memory-mapped
    for a local directory (shared by every rank and forked worker of a node through the page cache),
    downloaded for ``http(s)://``."""
    found = read_columns_with_meta(location)
    return found[0] if found else None
