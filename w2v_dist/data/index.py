"""Reading a shard set's ``index.json`` and turning its shard names into URLs that are safe to open.

Shard names come from a file that may have been downloaded, so they must be plain file names: no path
separators, no ``..``, no URL schemes and no ``pipe:``. Commands only ever come from the user's own config
(``data.shard_command``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from w2v_dist.data.text import LIBRISPEECH, TextPolicy
from w2v_dist.redact import redact

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ShardIndexError(ValueError):
    """An index that cannot be used, with the location it came from."""


@dataclass(frozen=True, slots=True)
class Utterance:
    """What the loader plans batches with, read from the index without touching audio. Slots: a rank holds
    one per utterance of the corpus (no per-object dict: 302 -> 206 B each in `bench plan`)."""

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


@dataclass(frozen=True)
class ShardSet:
    location: str
    urls: tuple[str, ...]
    seconds: tuple[float, ...]
    utterances: tuple[tuple[Utterance, ...], ...]
    """Per shard, its utterances in tar order."""
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

    @functools.cached_property
    def contents_digest(self) -> str:
        """What the shards hold (names, keys, lengths), wherever they are read from: a resume compares it."""
        digest = hashlib.sha256()
        for url, utterances in zip(self.urls, self.utterances):
            digest.update(json.dumps([url.rsplit("/", 1)[-1], [(u.key, u.num_samples, u.label_length)
                                                               for u in utterances]]).encode())
        return digest.hexdigest()

    @property
    def total_samples(self) -> int:
        return sum(len(u) for u in self.utterances)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)


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


def load_shard_set(location: str, shard_command: str = "", max_samples: int = 0) -> ShardSet:
    """Load and check an index; ``shard_command`` (``pipe:...{shard}...``) replaces direct opening.

    ``max_samples`` keeps only the first N utterances in index order (the seed script's ``MAX_SAMPLES``).
    """
    index = read_index_json(location)
    if index.get("version") != FORMAT_VERSION:
        raise ShardIndexError(f"{redact(location)}: index version {index.get('version')!r}, "
                              f"expected {FORMAT_VERSION}")
    urls, seconds, utterances = [], [], []
    remaining = max_samples or -1
    for shard_number, entry in enumerate(index["shards"]):
        name = check_shard_name(entry.get("name"), location)
        rows = entry["utterances"]
        if remaining >= 0:
            rows = rows[:remaining]
            remaining -= len(rows)
        if not rows:
            break
        urls.append(shard_command.replace("{shard}", name) if shard_command else _join(location, name))
        utts = tuple(Utterance(shard_number, pos, str(k), int(n), int(lab))
                     for pos, (k, n, lab) in enumerate(rows))
        utterances.append(utts)
        seconds.append(sum(u.num_samples for u in utts) / index["sample_rate"])
    if not urls:
        raise ShardIndexError(f"{redact(location)}: the index lists no utterances")
    return ShardSet(location, tuple(urls), tuple(seconds), tuple(utterances), int(index["sample_rate"]),
                    TextPolicy.from_index(index))


def read_vocab(location: str) -> dict[str, int] | None:
    """The shard set's ``vocab.json``; ``None`` when it has none (only a model without a tokenizer needs it:
    :func:`w2v_dist.model.load_processor` says so)."""
    try:
        return read_index_json(location, "vocab.json")
    except ShardIndexError:
        return None
