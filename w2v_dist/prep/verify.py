"""Re-reading a shard directory against its ``index.json``: bytes, sha256, member order, audio and
transcripts.

The loader trusts the index (it plans batches and resumes from it without reading audio), so a shard that
disagrees with it would fail hours into training, on some rank; ``w2v-dist verify`` finds that up front.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from w2v_dist.data.audio import decode_error
from w2v_dist.data.index import FORMAT_VERSION, ShardIndexError, check_shard_name, is_remote, read_index_json
from w2v_dist.data.offsets import NO_SPAN, ShardOffsetsError, row_span, scan_offsets
from w2v_dist.data.text import WORD_DELIMITER, label_length
from w2v_dist.prep.workers import process_pool

# The key/extension split webdataset applies to member names, so keys here are the keys the loader sees.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SHOWN = 5


@dataclass
class ShardReport:
    name: str
    samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    chars: set[str] = field(default_factory=set)
    """Transcript characters seen, checked against ``vocab.json`` once all shards are in."""

    def line(self) -> str:
        if not self.problems:
            return (f"{self.name}  ok  {self.samples} samples, {self.seconds / 3600:.3f} h, "
                    f"{self.bytes / 1e6:.1f} MB")
        more = len(self.problems) - _SHOWN
        return (f"{self.name}  FAILED  " + "; ".join(self.problems[:_SHOWN])
                + (f"; and {more} more" if more > 0 else ""))


@dataclass
class VerifyResult:
    shards: list[ShardReport]
    problems: list[str]
    """Problems of the directory as a whole (totals, vocabulary, leftovers)."""

    @property
    def ok(self) -> bool:
        return not self.problems and not any(r.problems for r in self.shards)

    def summary(self) -> str:
        bad = sum(1 for r in self.shards if r.problems)
        return (f"{'OK' if self.ok else 'FAILED'}: {len(self.shards)} shards, {len(self.shards) - bad} ok, "
                f"{bad} with problems, {len(self.problems)} directory problems; "
                f"{sum(r.samples for r in self.shards)} samples, "
                f"{sum(r.seconds for r in self.shards) / 3600:.3f} h, "
                f"{sum(r.bytes for r in self.shards) / 1e6:.1f} MB")


def _samples(path: Path, report: ShardReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` grouping consecutive members by key, as webdataset does."""
    key, parts = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            match = _KEY_EXT.match(member.name)
            if not member.isfile() or not match:
                report.problems.append(f"unexpected member {member.name!r}")
                continue
            if match.group(1) != key and key is not None:
                yield key, parts
                parts = {}
            key = match.group(1)
            parts[match.group(2)] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if key is not None:
        yield key, parts


def _check_sample(key: str, parts: dict[str, bytes], row: list, sample_rate: int,
                  report: ShardReport) -> None:
    """Compare one sample with its index row and its own json; problems go to ``report``."""
    problems = report.problems
    expected_key, expected_samples, expected_label = row[:3]  # [..., byte_offset, byte_size] since offsets
    if key != expected_key:
        # out of order: the row's numbers belong to another sample, so compare to the json only
        problems.append(f"sample {report.samples}: key {key!r}, the index says {expected_key!r}")
        expected_samples = expected_label = None
    if set(parts) != {"flac", "json"}:
        problems.append(f"{key}: members {sorted(parts)}, expected ['flac', 'json']")
    try:
        meta = json.loads(parts.get("json", b""))
        if not isinstance(meta, dict) or not isinstance(meta.get("text"), str):
            raise ValueError("no 'text' field")
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problems.append(f"{key}: bad json ({err})")
        meta = {"text": ""}
    report.chars.update(meta["text"])
    if expected_label is not None and label_length(meta["text"]) != expected_label:
        problems.append(f"{key}: label length {label_length(meta['text'])}, the index says {expected_label}")
    try:
        # Decoding every frame (not just the header) is what catches a damaged FLAC body.
        with sf.SoundFile(io.BytesIO(parts.get("flac", b""))) as audio:
            frames, rate, channels = len(audio.read(dtype="int16")), audio.samplerate, audio.channels
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        problems.append(f"{key}: unreadable FLAC ({decode_error(err)})")
        return
    report.seconds += frames / rate
    if frames != meta.get("num_samples") or expected_samples not in (None, frames):
        problems.append(f"{key}: {frames} samples decoded, the index says {expected_samples}, "
                        f"the json {meta.get('num_samples')}")
    if rate != sample_rate or meta.get("sample_rate") != sample_rate or channels != 1:
        problems.append(f"{key}: {rate} Hz {channels} ch (json {meta.get('sample_rate')} Hz), expected "
                        f"{sample_rate} Hz mono")


def verify_shard(directory: str, entry: dict, sample_rate: int) -> ShardReport:
    """Check one shard file against its index entry; never raises for a damaged shard."""
    report = ShardReport(str(entry["name"]))
    path = Path(directory) / report.name
    if not path.is_file():
        report.problems.append("missing: the index lists it but there is no such file")
        return report
    with open(path, "rb") as stream:
        report.bytes, digest = (os.fstat(stream.fileno()).st_size,
                                hashlib.file_digest(stream, "sha256").hexdigest())
    if report.bytes != entry.get("bytes"):
        report.problems.append(f"{report.bytes} bytes, the index says {entry.get('bytes')}")
    if digest != entry.get("sha256"):
        report.problems.append("sha256 differs from the index")
    rows = entry.get("utterances", [])
    try:
        for key, parts in _samples(path, report):
            if report.samples < len(rows):
                _check_sample(key, parts, rows[report.samples], sample_rate, report)
            report.samples += 1
    except (tarfile.TarError, EOFError, OSError) as err:
        report.problems.append(f"unreadable tar after {report.samples} samples ({err})")
    if report.samples != len(rows):
        report.problems.append(f"{report.samples} samples in the tar, the index lists {len(rows)}")
    _check_byte_ranges(path, rows, report)
    if entry.get("samples") != len(rows):
        report.problems.append(f"the index counts {entry.get('samples')} samples but lists {len(rows)}")
    return report


def _check_byte_ranges(path: Path, rows: list, report: ShardReport) -> None:
    """The byte range the index gives each sample (what training reads) against the tar's headers."""
    if not rows or any(row_span(row) == NO_SPAN for row in rows):
        return  # an index from before byte ranges: the loader streams whole shards
    try:
        spans = scan_offsets(path)
    except ShardOffsetsError as err:
        report.problems.append(f"no byte ranges ({err})")
        return
    wrong = [str(row[0]) for row in rows if spans.get(str(row[0])) != row_span(row)]
    if wrong:
        report.problems.append(f"byte ranges of {len(wrong)} samples differ from the tar (first: "
                               f"{wrong[0]}); run 'w2v-dist index DIR' to record them again")


def _directory_problems(root: Path, index: dict, reports: list[ShardReport]) -> list[str]:
    """What is wrong beyond single shards: duplicate keys, totals, vocabulary, rejects, leftovers."""
    problems = [f"{p.name}: leftover of an interrupted write" for p in sorted(root.glob("*.partial"))]
    keys = Counter(row[0] for entry in index["shards"] for row in entry.get("utterances", []))
    if dupes := sorted(k for k, n in keys.items() if n > 1):
        problems.append(f"index.json lists keys more than once: {dupes[:_SHOWN]}")
    totals = index.get("totals", {})
    listed = sum(len(e.get("utterances", [])) for e in index["shards"])
    if totals.get("written") != listed or totals.get("shards") != len(index["shards"]):
        problems.append(f"index.json totals say {totals.get('written')} samples in {totals.get('shards')} "
                        f"shards, its shard list has {listed} in {len(index['shards'])}")
    if (rejects := root / "rejects.jsonl").is_file():
        count = sum(1 for line in rejects.read_text(encoding="utf-8").splitlines() if line.strip())
        if count != totals.get("rejected"):
            problems.append(f"rejects.jsonl has {count} lines, index.json totals say "
                            f"{totals.get('rejected')}")
    vocab_file = root / "vocab.json"
    if not vocab_file.is_file():
        problems.append("vocab.json is missing")
    else:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        seen = {WORD_DELIMITER if c == " " else c for r in reports for c in r.chars}
        if missing := sorted(seen - set(vocab)):
            problems.append(f"transcript characters missing from vocab.json: {''.join(missing)!r}")
    return problems


def verify_dir(directory: str | Path, workers: int = 2,
               on_shard: Callable[[ShardReport], None] | None = None) -> VerifyResult:
    """Verify every shard of a local shard directory; ``on_shard`` sees each report as it is ready.

    Raises :class:`ShardIndexError` when ``index.json`` itself is missing or unusable.
    """
    if is_remote(str(directory)):
        raise ShardIndexError(f"{directory}: verify reads local directories only (copy the shards first)")
    root = Path(directory)
    index = read_index_json(str(root))
    shards = index.get("shards")
    if index.get("version") != FORMAT_VERSION or not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("utterances", []), list) for e in shards):
        raise ShardIndexError(f"{root}: not a version {FORMAT_VERSION} index with a list of shard objects")
    reports: list[ShardReport] = []

    def emit(report: ShardReport) -> None:
        reports.append(report)
        if on_shard:
            on_shard(report)

    jobs, names = [], Counter(str(e.get("name")) for e in index["shards"])
    for entry in index["shards"]:
        try:
            check_shard_name(entry.get("name"), str(root))  # never open a path the index should not name
        except ShardIndexError as err:
            emit(ShardReport(str(entry.get("name")), problems=[str(err)]))
            continue
        jobs.append((str(root), entry, int(index.get("sample_rate", 16_000))))
    if workers > 1 and len(jobs) > 1:
        with process_pool(min(workers, len(jobs))) as pool:
            for report in pool.map(verify_shard, *zip(*jobs, strict=True)):
                emit(report)
    else:
        for job in jobs:
            emit(verify_shard(*job))
    for name in sorted(n for n, count in names.items() if count > 1):
        emit(ShardReport(name, problems=["listed more than once in index.json"]))
    for extra in sorted(p.name for p in root.glob("shard-*.tar") if p.name not in names):
        emit(ShardReport(extra, problems=["not listed in index.json (an extra, unindexed shard)"]))
    return VerifyResult(reports, _directory_problems(root, index, reports))
