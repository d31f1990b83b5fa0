"""Reading a shard set's index (its columns, :mod:`w2v_dist.data.columns`, or ``index.json``) and turning its
shard names into URLs that are safe to open.

Shard names come from a file that may have been downloaded, so they must be plain file names: no path
separators, no ``..``, no URL schemes and no ``pipe:``. Commands only ever come from the user's own config
(``data.shard_command``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from w2v_dist.data.columns import INDEX_NAME, Columns, read_columns_with_meta
from w2v_dist.data.text import LIBRISPEECH, TextPolicy
from w2v_dist.redact import redact

FORMAT_VERSION = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ShardIndexError(ValueError):
    """An index that cannot be used, with the location it came from."""


@dataclass(frozen=True, slots=True)
class Utterance:
    """What batches are made of, read from the index without touching audio (the index itself is held as
    columns). Slots: no per-object dict (302 -> 206 B each in `bench plan`)."""

    shard: int
    position: int
    """Position of the sample inside its shard."""
    key: str
    num_samples: int
    label_length: int
    speed: float = 1.0
    """Training with speed perturbation: the factor this epoch's plan drew (``num_samples`` is then the
    length after it, ``source_samples`` the one in the shard)."""
    source_samples: int = 0


class ShardUtterances(Sequence[tuple[Utterance, ...]]):
    """Per shard, its utterances in tar order, made from the columns when asked for: holding them all would
    bring back an object per utterance. The last few shards asked for are kept (readers ask for one shard
    many times in a row)."""

    def __init__(self, columns: Columns) -> None:
        self.columns = columns
        self._shard = functools.lru_cache(maxsize=8)(self._make)

    def __len__(self) -> int:
        return self.columns.shards

    @overload
    def __getitem__(self, index: int) -> tuple[Utterance, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[Utterance, ...], ...]: ...

    def __getitem__(self, index: int | slice) -> tuple[Utterance, ...] | tuple[tuple[Utterance, ...], ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"shard {index} of {len(self)}")
        return self._shard(index % len(self))

    def _make(self, shard: int) -> tuple[Utterance, ...]:
        rows = self.columns.shard_rows(shard)
        return tuple(map(Utterance, itertools.repeat(shard), range(len(rows)), self.columns.keys(rows),
                         self.columns.num_samples[rows.start:rows.stop].tolist(),
                         self.columns.label_length[rows.start:rows.stop].tolist()))

    def __reduce__(self) -> tuple[type[ShardUtterances], tuple[Columns]]:
        return ShardUtterances, (self.columns,)  # the cache holds a bound method: not picklable


def columns_of(utterances: Sequence[Sequence[Utterance]]) -> Columns:
    """The columns of per-shard utterances, which must be numbered as the columns number them (by place)."""
    for shard, utts in enumerate(utterances):
        if any((u.shard, u.position) != (shard, p) for p, u in enumerate(utts)):
            raise ValueError(f"shard {shard}'s utterances are not numbered ({shard}, 0), ({shard}, 1), ...")
    rows = [[[u.key, u.num_samples, u.label_length] for u in utts] for utts in utterances]
    return Columns.from_index({"shards": [{"utterances": shard_rows} for shard_rows in rows]})


@dataclass(frozen=True)
class ShardSet:
    location: str
    urls: tuple[str, ...]
    seconds: tuple[float, ...]
    columns: Columns
    """Per utterance, shard after shard in tar order: lengths, keys, byte ranges. A set built in memory may
    pass per-shard ``Utterance`` tuples instead (converted by :func:`columns_of`)."""
    sample_rate: int
    text_policy: TextPolicy = LIBRISPEECH
    """How the transcripts were normalised (hypotheses scored against them get the same)."""
    parts: tuple[str, ...] = ()
    """A mix of shard sets (``data.train_mix``, made and read by :mod:`w2v_dist.data.mix`): their locations;
    empty for one set."""
    shard_parts: tuple[int, ...] = ()
    """A mix: the part each shard belongs to."""
    fractions: tuple[float, ...] = ()
    """A mix: the fraction of each part read per epoch."""

    def __post_init__(self) -> None:
        if not isinstance(self.columns, Columns):
            object.__setattr__(self, "columns", columns_of(self.columns))
        if self.columns.shards != len(self.urls):
            raise ValueError(f"{len(self.urls)} shard URLs for {self.columns.shards} shards of columns")

    @functools.cached_property
    def utterances(self) -> ShardUtterances:
        """Per shard, its utterances in tar order (made one shard at a time)."""
        return ShardUtterances(self.columns)

    @functools.cached_property
    def contents_digest(self) -> str:
        """What the shards hold (names, keys, lengths; not byte offsets), wherever they are read from: a
        resume compares it."""
        digest = hashlib.sha256(json.dumps([url.rsplit("/", 1)[-1] for url in self.urls]).encode())
        for name in ("shard_starts", "key_starts", "key_blob", "num_samples", "label_length"):
            digest.update(np.ascontiguousarray(getattr(self.columns, name)).data)
        return digest.hexdigest()

    @property
    def total_samples(self) -> int:
        return self.columns.rows

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)


def shard_seconds(columns: Columns, sample_rate: int) -> tuple[float, ...]:
    """Per shard, its audio seconds."""
    totals = np.concatenate([[0], np.cumsum(columns.num_samples, dtype=np.int64)])[columns.shard_starts]
    return tuple((np.diff(totals) / sample_rate).tolist())


def is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def check_shard_name(name: object, location: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ShardIndexError(f"{redact(location)}: refusing shard name {name!r}: index shard names must be "
                              "plain file names (no separators, '..', schemes or commands)")
    return name


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_remote(location) else str(Path(location) / name)


def read_index_json(location: str, name: str = INDEX_NAME) -> dict:
    """The parsed ``index.json`` (or another JSON file, ``name``) of a local directory or an ``http(s)://``
    prefix."""
    import webdataset as wds  # lazily: sharding workers import this module and must stay light

    url = _join(location, name)
    try:
        with wds.gopen(url, "rb") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        raise ShardIndexError(f"no {name} at {redact(url)}: run 'w2v-dist shard' to create shards") from None
    except json.JSONDecodeError as err:
        raise ShardIndexError(f"{redact(url)} is not valid JSON: {err}") from None
    except Exception as err:  # gopen raises plain IOError/ValueError for HTTP and pipe failures
        raise ShardIndexError(f"cannot read {redact(url)}: {redact(str(err))}") from None


def _check_version(header: dict, location: str) -> None:
    if header.get("version") != FORMAT_VERSION:
        raise ShardIndexError(f"{redact(location)}: index version {header.get('version')!r}, "
                              f"expected {FORMAT_VERSION}")


def load_shard_set(location: str, shard_command: str = "", max_samples: int = 0) -> ShardSet:
    """Load and check an index; ``shard_command`` (``pipe:...{shard}...``) replaces direct opening.

    Reads the columns beside ``index.json`` when they are current (:func:`read_columns_with_meta`), else
    parses it. ``max_samples`` keeps only the first N utterances in index order (the seed script's
    ``MAX_SAMPLES``).
    """
    if found := read_columns_with_meta(location):
        columns, meta = found
        header, names = meta["header"], meta["shard_names"]
        _check_version(header, location)
        columns = columns.head(max_samples)
    else:
        header = read_index_json(location)
        _check_version(header, location)
        names = [entry.get("name") for entry in header["shards"]]
        try:
            columns = Columns.from_index(header, max_samples)
        except (TypeError, ValueError) as err:
            raise ShardIndexError(f"{redact(location)}: malformed index rows: {err}") from None
    names = [check_shard_name(name, location) for name in names][:columns.shards]
    if not columns.rows:
        raise ShardIndexError(f"{redact(location)}: the index lists no utterances")
    urls = tuple(shard_command.replace("{shard}", name) if shard_command else _join(location, name)
                 for name in names)
    sample_rate = int(header["sample_rate"])
    return ShardSet(location, urls, shard_seconds(columns, sample_rate), columns, sample_rate,
                    TextPolicy.from_index(header))


def read_vocab(location: str) -> dict[str, int] | None:
    """The shard set's ``vocab.json``; ``None`` when it has none (only a model without a tokenizer needs it:
    :func:`w2v_dist.model.load_processor` says so)."""
    try:
        return read_index_json(location, "vocab.json")
    except ShardIndexError:
        return None
