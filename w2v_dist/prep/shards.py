"""Writing WebDataset shards: probe every input, reject what cannot train, pack, write atomically, index
last.

The format is documented in ``docs/data-format.md``. Invariant: inputs = written + rejected, and every
reject has a line in ``rejects.jsonl``.
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
import re
import stat
import time
import unicodedata
from collections import Counter
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm import tqdm

from w2v_dist.data.audio import SAMPLE_RATE, EncoderGeometry, decode, decode_error, encode_flac, to_16k_mono
from w2v_dist.data.index import FORMAT_VERSION, INDEX_NAME
from w2v_dist.data.offsets import save_index
from w2v_dist.data.text import (
    LIBRISPEECH,
    TextPolicy,
    TranscriptError,
    build_vocab,
    label_length,
    write_vocab,
)
from w2v_dist.prep import flac
from w2v_dist.prep.sources import Reject, Source
from w2v_dist.prep.tar_writer import FileReader, TarSink
from w2v_dist.prep.workers import process_pool

SHARD_PATTERN = "shard-{:06d}.tar"
PROBE_CHUNK = 64
"""Inputs per probing task: one task per file costs more in scheduling than a header check takes."""


@dataclass
class ShardOptions:
    shard_size_mb: float = 256.0
    workers: int = 2
    min_seconds: float = 0.0
    max_seconds: float = 35.0
    shuffle_seed: int | None = 0
    sort_in_shards: bool = True
    overwrite: bool = False
    dry_run: bool = False
    check_audio: str = "full"
    """``full`` decodes every input; ``tail`` checks only the header and the final frame, which a truncated
    FLAC cannot supply (mid-file corruption is then caught by the loader, which skips and counts it)."""
    geometry: EncoderGeometry = field(default_factory=EncoderGeometry)
    text: TextPolicy = LIBRISPEECH
    """How transcripts are normalised and which characters they may hold; recorded in ``index.json``."""
    min_char_count: int = 1
    """A character seen in fewer accepted transcripts than this is left out of the vocabulary, and the
    transcripts holding it are rejected (named in ``rejects.jsonl``): typos and stray symbols of a large
    corpus."""


@dataclass(frozen=True)
class Probed:
    """An input that passed every check, with what its shard json records."""

    source: Source
    text: str
    num_samples: int
    bytes: int
    converted_from: str = ""
    """``"<rate> Hz, <channels> ch"`` when the audio was resampled/down-mixed and re-encoded."""

    index: int = 0
    """The source's position in the job's source list."""

    def row(self) -> ProbedRow:
        return self.text, self.num_samples, self.bytes, self.converted_from, self.index


ProbedRow = tuple[str, int, int, str, int]
"""A :class:`Probed` as it crosses between processes: the source's position in the job's list stands in for
the source (pickling a ``Path`` per file costs as much as probing the file)."""


TAIL_SAMPLES = 4096
"""``check_audio=tail`` decodes this many final samples when :mod:`~w2v_dist.prep.flac` cannot vouch for the
file: FLAC's usual block size, so the last frame, which a truncated file cannot supply."""


def audio_shape(audio: Path, full: bool) -> tuple[int, int, int]:
    """(samples, rate, channels) of an audio file, after decoding all of it or checking that it ends in a
    complete final frame (the header and the tail, not the whole file)."""
    if full:
        decoded, rate = decode(audio.read_bytes())
        return decoded.shape[0], rate, decoded.shape[1]
    if (shape := flac.stream_shape(audio)) is not None:
        return shape
    with sf.SoundFile(str(audio)) as stream:
        frames, rate, channels = stream.frames, stream.samplerate, stream.channels
        tail = min(frames, TAIL_SAMPLES)
        stream.seek(frames - tail)
        if len(stream.read(tail, dtype="float32")) != tail:
            raise ValueError(f"truncated: the header promises {frames} samples")
    return frames, rate, channels


def probe(src: Source, opts: ShardOptions, index: int = 0) -> Probed | Reject:
    """Decode and check one input; a :class:`Reject` says why it cannot be written."""
    def reject(reason: str) -> Reject:
        return Reject(src.key, src.source, reason)

    audio = src.audio
    try:
        status = os.stat(audio) if audio is not None else None
    except OSError:
        status = None
    if audio is None or status is None or not stat.S_ISREG(status.st_mode):
        return reject("audio file missing")
    if src.text is None:
        return reject("no transcript line")
    try:
        text = opts.text.normalize(src.text)
    except TranscriptError as err:
        return reject(str(err))
    size = status.st_size
    try:
        num_samples, rate, channels = audio_shape(audio, full=opts.check_audio == "full")
        converted = ""
        if rate != SAMPLE_RATE or channels != 1:
            converted = f"{rate} Hz, {channels} ch"
            raw = encode_flac(to_16k_mono(*decode(audio.read_bytes())))
            num_samples, size = len(sf.SoundFile(io.BytesIO(raw))), len(raw)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
        return reject(f"unreadable audio ({decode_error(err)})")
    seconds = num_samples / SAMPLE_RATE
    if num_samples < opts.geometry.receptive_field:
        return reject(f"audio shorter than the encoder's receptive field ({num_samples} samples)")
    if not opts.min_seconds <= seconds <= opts.max_seconds:
        return reject(f"duration {seconds:.2f}s outside [{opts.min_seconds}, {opts.max_seconds}]")
    frames, labels = opts.geometry.frames(num_samples), label_length(text)
    if frames < labels:
        return reject(f"CTC infeasible: {frames} frames < {labels} label tokens")
    return Probed(src, text, num_samples, size, converted, index)


_job: tuple[list[Source], ShardOptions] | None = None
"""The sources and options of the job a pool worker serves, inherited or sent once when the worker starts."""


def _adopt_job(sources: list[Source], opts: ShardOptions) -> None:
    global _job
    _job = sources, opts


def _probe_chunk(start: int) -> list[ProbedRow | Reject]:
    assert _job is not None
    sources, opts = _job
    results = (probe(sources[i], opts, i) for i in range(start, min(start + PROBE_CHUNK, len(sources))))
    return [r.row() if isinstance(r, Probed) else r for r in results]


def _write_rows(path: Path, rows: list[ProbedRow]) -> dict[str, object]:
    assert _job is not None
    return write_shard(path, [Probed(_job[0][row[-1]], *row) for row in rows])


def plan_shards(items: list[Probed], opts: ShardOptions) -> list[list[Probed]]:
    """Group accepted inputs into shards of about ``shard_size_mb`` (order: shuffled; within a shard, longest
    first unless ``sort_in_shards`` is off)."""
    ordered = sorted(items, key=lambda p: p.source.key)
    if opts.shuffle_seed is not None:
        random.Random(opts.shuffle_seed).shuffle(ordered)
    limit = opts.shard_size_mb * 1e6
    shards: list[list[Probed]] = [[]]
    size = 0
    for item in ordered:
        if shards[-1] and size + item.bytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.bytes
    if opts.sort_in_shards:  # longest first, as training cuts batches: a batch's samples are adjacent
        shards = [sorted(shard, key=lambda p: -p.num_samples) for shard in shards]
    return [s for s in shards if s]


def sample_json(item: Probed) -> dict[str, object]:
    meta: dict[str, object] = {"text": item.text, "seconds": item.num_samples / SAMPLE_RATE,
                               "num_samples": item.num_samples, "sample_rate": SAMPLE_RATE,
                               "speaker": item.source.speaker, "chapter": item.source.chapter,
                               "source": item.source.source}
    if item.converted_from:
        meta["converted_from"] = item.converted_from
    return meta


def write_shard(path: Path, items: list[Probed]) -> dict[str, object]:
    """Write one tar under a temporary name, then rename; return its index entry, whose rows hold each
    sample's byte range (:mod:`w2v_dist.data.offsets`) so that a reader can fetch it alone.

    The standard library's tar headers, not webdataset's ``TarWriter``: importing webdataset pulls in torch,
    and the members are the same.
    """
    tmp = path.with_name(path.name + ".partial")
    reader = FileReader()
    rows: list[list[object]] = []
    with open(tmp, "wb") as out:
        sink = TarSink(out)
        for item in items:
            audio: bytes | memoryview = reader.read(item.source.audio)  # type: ignore[arg-type]
            if item.converted_from:
                audio = encode_flac(to_16k_mono(*decode(bytes(audio))))
            start = sink.offset
            sink.add(f"{item.source.key}.flac", audio)
            sink.add(f"{item.source.key}.json", json.dumps(sample_json(item), sort_keys=True).encode())
            rows.append([item.source.key, item.num_samples, label_length(item.text), start,
                         sink.offset - start])
        sink.close()
    tmp.rename(path)
    seconds = round(sum(i.num_samples for i in items) / SAMPLE_RATE, 3)
    return {"name": path.name, "samples": len(items), "seconds": seconds, "bytes": sink.offset,
            "sha256": sink.sha256.hexdigest(), "utterances": rows}


def histogram(seconds: list[float], bin_seconds: float = 1.0) -> dict[str, object]:
    counts = [0] * (int(max(seconds, default=0) // bin_seconds) + 1)
    for s in seconds:
        counts[int(s // bin_seconds)] += 1
    return {"bin_seconds": bin_seconds, "counts": counts}


def _probe_all(pool: Executor, sources: list[Source], opts: ShardOptions, accepted: list[Probed],
               rejects: list[Reject], bar: tqdm) -> None:
    """Probe every input in parallel, in order, sorting results into ``accepted`` and ``rejects``."""
    total = 0
    for results in pool.map(_probe_chunk, range(0, len(sources), PROBE_CHUNK)):
        for result in results:
            if isinstance(result, Reject):
                rejects.append(result)
            else:
                accepted.append(Probed(sources[result[-1]], *result))
                total += accepted[-1].num_samples
        bar.set_postfix_str(f"{total / SAMPLE_RATE / 3600:.2f} h accepted, {len(rejects)} rejected",
                            refresh=False)
        bar.update(len(results))


def reject_rare_characters(accepted: list[Probed], min_count: int, rejects: list[Reject]) -> list[Probed]:
    """``accepted`` less the transcripts holding a character that fewer than ``min_count`` transcripts hold
    (those go to ``rejects``, naming the characters)."""
    counts = Counter(c for p in accepted for c in set(p.text))
    rare = {c for c, n in counts.items() if n < min_count}
    if not rare:
        return accepted
    kept = []
    for probed in accepted:
        if found := sorted(set(probed.text) & rare):
            rejects.append(Reject(probed.source.key, probed.source.source,
                                  f"rare characters {''.join(found)!r} (in fewer than {min_count} "
                                  f"transcripts)"))
        else:
            kept.append(probed)
    return kept


class NothingAccepted(ValueError):
    """Every input was rejected (or there were none): no shard, index or vocabulary is written."""


def write_rejects(rejects: list[Reject], out_dir: Path) -> None:
    with open(out_dir / "rejects.jsonl", "w") as handle:
        for r in sorted(rejects, key=lambda r: r.key):
            handle.write(json.dumps(asdict(r)) + "\n")


def reason_kind(reason: str) -> str:
    """A reject reason without its particulars (characters, numbers, decoder messages), to count alike
    reasons."""
    return re.sub(r"\d+(\.\d+)?", "N", re.split(r"[:(\['\"]", reason, maxsplit=1)[0]).strip()


def nothing_accepted(rejects: list[Reject], opts: ShardOptions) -> str:
    """Why no input was accepted: the commonest kind of reason, with an example, and the option that accepts
    such inputs where one does."""
    if not rejects:
        return "no inputs were found"
    kinds = Counter(reason_kind(r.reason) for r in rejects)
    kind, count = kinds.most_common(1)[0]
    example = next(r for r in rejects if reason_kind(r.reason) == kind)
    text = (f"all {len(rejects)} inputs were rejected; the commonest reason ({count} of {len(rejects)}): "
            f"{example.reason} (e.g. {example.key})")
    if kind == "characters outside the vocabulary":
        chars = "".join(ast.literal_eval(r.reason.partition(": ")[2]) for r in rejects
                        if reason_kind(r.reason) == kind)
        categories = {unicodedata.category(c)[0] if unicodedata.category(c) != "Nd" else "Nd" for c in chars}
        hints = [hint for category, hint in (
            ("Nd", "--digits keep accepts digits (their spoken form is ambiguous: better, write numbers as "
                   "words)"),
            ("L", "--alphabet any accepts the letters of every script"),
            ("M", "--alphabet any accepts combining marks"),
            ("P", "--punctuation keep transcribes punctuation")) if category in categories]
        text += "".join(f"; {hint}" for hint in dict.fromkeys(hints))
    elif kind.startswith("duration"):
        text += (f"; --min-seconds and --max-seconds set the range (now {opts.min_seconds}, "
                 f"{opts.max_seconds})")
    return text


def shard_corpus(sources: list[Source], out: str | Path, opts: ShardOptions, described: dict[str, object]
                 ) -> dict[str, Any]:
    """Probe, pack and write ``sources`` into ``out``; return the index (also written unless dry-run)."""
    out_dir = Path(out)
    if not opts.dry_run:
        if out_dir.exists() and any(out_dir.glob("*.tar")) and not opts.overwrite:
            raise FileExistsError(f"{out_dir} already holds shards; pass --overwrite to replace them")
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("shard-*.tar"), *out_dir.glob("*.partial"), out_dir / INDEX_NAME]:
            stale.unlink(missing_ok=True)
    started = time.monotonic()
    accepted: list[Probed] = []
    rejects: list[Reject] = []
    with process_pool(opts.workers, _adopt_job, (sources, opts)) as pool:
        with tqdm(total=len(sources), desc="probe", unit="utt", disable=None) as bar:
            _probe_all(pool, sources, opts, accepted, rejects, bar)
        accepted = reject_rare_characters(accepted, opts.min_char_count, rejects)
        if not accepted:
            if not opts.dry_run:
                write_rejects(rejects, out_dir)
            raise NothingAccepted(f"nothing {'would be ' * opts.dry_run}written: "
                                  f"{nothing_accepted(rejects, opts)}"
                                  + ("" if opts.dry_run or not rejects
                                     else f"; see {out_dir / 'rejects.jsonl'}"))
        groups = plan_shards(accepted, opts)
        jobs = [(out_dir / SHARD_PATTERN.format(i), group) for i, group in enumerate(groups)]
        entries: list[dict[str, Any]]
        if opts.dry_run:
            entries = [{"name": p.name, "samples": len(g),
                        "seconds": sum(i.num_samples for i in g) / SAMPLE_RATE,
                        "bytes": sum(i.bytes for i in g)} for p, g in jobs]
        else:
            written = pool.map(_write_rows, [path for path, _ in jobs],
                               [[p.row() for p in g] for g in groups])
            entries = list(tqdm(written, total=len(jobs), desc="write", unit="shard", disable=None))
    seconds = [p.num_samples / SAMPLE_RATE for p in accepted]
    index: dict[str, Any] = {"format": "w2v-dist-shards", "version": FORMAT_VERSION, **described,
             "text_policy": asdict(opts.text),
             "options": {k: v for k, v in asdict(opts).items()
                         if k not in ("workers", "overwrite", "dry_run")},
             "sample_rate": SAMPLE_RATE, "shards": entries,
             "totals": {"inputs": len(sources), "written": len(accepted), "rejected": len(rejects),
                        "shards": len(entries), "seconds": round(sum(seconds), 3),
                        "hours": round(sum(seconds) / 3600, 4),
                        "bytes": sum(int(e["bytes"]) for e in entries)},
             "duration_histogram": histogram(seconds)}
    assert index["totals"]["inputs"] == len(accepted) + len(rejects)
    if not opts.dry_run:
        write_rejects(rejects, out_dir)
        write_vocab(build_vocab(p.text for p in accepted), out_dir / "vocab.json")
        save_index(out_dir, index)
    index["elapsed_seconds"] = time.monotonic() - started
    return index
