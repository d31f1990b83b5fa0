"""Reading only the samples wanted from a tar shard, by the byte ranges its index records: a seek in a local
file, an HTTP Range request (through curl) for a remote one, retried as a whole-shard read is
(:func:`~w2v_dist.data.shard_reader.retrying`)."""

from __future__ import annotations

import logging
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

from w2v_dist.data.index import is_remote
from w2v_dist.data.offsets import parse_sample
from w2v_dist.data.shard_reader import (
    RemoteShardError,
    RetryPolicy,
    Sample,
    curl_command,
    read_members,
    retrying,
)
from w2v_dist.redact import redact

log = logging.getLogger("w2v_dist.data")


class RangesUnsupported(RemoteShardError):
    """A server that answers a request for part of a shard with all of it (or more than asked)."""


def read_ranges(url: str, ranges: Sequence[tuple[str, int, int]], skips: Counter[str],
                retry: RetryPolicy = RetryPolicy()) -> Iterator[Sample]:
    """The samples ``(key, byte_offset, byte_size)`` of one shard (distinct keys, spans from its index),
    in the order given, reading only their bytes.

    Spans adjacent in the file are read as one run, runs in file order: a local tar is opened once and
    seeks to each run; ``http(s)://`` fetches each run with one HTTP Range request (a server that ignores
    Range fails at once, saying so). Failures are handled as by :func:`read_members`: a remote run that fails
    is retried (the samples already read are not fetched again), a local tar shorter than a span ends the
    shard with a warning. ``pipe:`` commands and other schemes cannot seek, and rows without offsets (an
    index from before them, ``-1``) name no span: those stream the whole shard through
    :func:`read_members`. Bytes that are not whole members of the expected key raise
    :class:`~w2v_dist.data.offsets.ShardOffsetsError`.
    """
    keys = [key for key, _, _ in ranges]
    if any(offset < 0 for _, offset, _ in ranges) or (
            is_remote(url) and not url.startswith(("http://", "https://"))):
        return _in_order(keys, read_members(url, set(keys), skips, retry))
    runs = _coalesce(ranges)
    read = _read_local if not is_remote(url) else _read_http
    return _in_order(keys, retrying(
        url, lambda delivered: read(url, [[s for s in run if s[0] not in delivered] for run in runs], retry),
        skips, retry))


def _in_order(keys: Sequence[str], samples: Iterator[Sample]) -> Iterator[Sample]:
    """``samples`` in the order of ``keys``, each held until its turn; those that never come (a truncated
    shard) are left out, the rest still in order."""
    held: dict[str, dict[str, bytes]] = {}
    position = 0
    for key, members in samples:
        held[key] = members
        while position < len(keys) and keys[position] in held:
            yield keys[position], held.pop(keys[position])
            position += 1
    yield from ((key, held.pop(key)) for key in keys[position:] if key in held)


Span = tuple[str, int, int]


def _coalesce(ranges: Sequence[Span]) -> list[list[Span]]:
    """The spans in file order, grouped into runs of spans that follow one another without a gap."""
    runs: list[list[Span]] = []
    for span in sorted(ranges, key=lambda s: s[1]):
        if runs and runs[-1][-1][1] + runs[-1][-1][2] == span[1]:
            runs[-1].append(span)
        else:
            runs.append([span])
    return runs


def _read_exact(stream: IO[bytes], size: int, key: str) -> bytes:
    chunks, got = [], 0
    while got < size and (chunk := stream.read(size - got)):
        chunks.append(chunk)
        got += len(chunk)
    if got < size:
        raise EOFError(f"the shard ends {size - got} bytes before the end of sample {key!r}")
    return b"".join(chunks)


def _read_local(path: str, runs: list[list[Span]], retry: RetryPolicy) -> Iterator[Sample]:
    """A local tar opened once, unbuffered (no read-ahead past a span), a seek per run."""
    try:
        stream = open(path, "rb", buffering=0)
    except OSError as err:
        raise RuntimeError(f"cannot open shard {path}: {err}") from err
    with stream:
        for run in filter(None, runs):
            stream.seek(run[0][1])
            for key, _, size in run:
                yield key, parse_sample(_read_exact(stream, size, key), key, path)


def _read_http(url: str, runs: list[list[Span]], retry: RetryPolicy) -> Iterator[Sample]:
    """One HTTP Range request per run."""
    for run in filter(None, runs):
        start, end = run[0][1], run[-1][1] + run[-1][2]
        with _fetch_range(url, start, end, retry) as stream:
            for key, _, size in run:
                yield key, parse_sample(_read_exact(stream, size, key), key, redact(url))


@contextmanager
def _fetch_range(url: str, start: int, end: int, retry: RetryPolicy) -> Iterator[IO[bytes]]:
    """The body of bytes ``[start, end)`` of ``url``, once its status says it is that range. A body that
    ends early raises an ``OSError`` (curl's exit status) when the transfer failed, an ``EOFError`` when the
    file itself is shorter (a truncated shard, as :func:`read_members` treats it)."""
    command = curl_command(url, retry, "--include", "--suppress-connect-headers", "-r", f"{start}-{end - 1}")
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    except OSError as err:
        raise RuntimeError(f"cannot open shard {redact(url)}: {err}") from err
    assert proc.stdout is not None
    try:
        try:
            _expect_partial_content(proc.stdout, url)
            yield proc.stdout
            extra = proc.stdout.read(1)
        except EOFError:  # curl closed its output, so it is exiting: its status says why the body ended
            if (status := proc.wait(retry.stall_seconds)) != 0:
                raise OSError(f"curl exit {status}") from None
            raise
        if extra:
            raise RangesUnsupported(f"shard {redact(url)}: the server sent more than the bytes {start}-"
                                   f"{end - 1} asked for; it does not support HTTP Range requests properly")
    finally:
        proc.stdout.close()
        if proc.poll() is None:  # left early, or a failure: nobody wants the rest
            proc.kill()
        proc.wait()


def _expect_partial_content(stream: IO[bytes], url: str) -> None:
    """Read the response headers ``curl --include`` writes before the body (a block per redirect followed,
    then the final one); the final status must be 206 Partial Content."""
    while True:
        status_line = stream.readline()
        if not status_line:
            raise EOFError("no HTTP response")
        parts = status_line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise OSError(f"unexpected HTTP response {status_line[:80]!r}")
        while stream.readline() not in (b"\r\n", b"\n", b""):
            pass
        status = int(parts[1])
        if status == 206:
            return
        if status == 200:
            raise RangesUnsupported(f"shard {redact(url)}: the server does not support HTTP Range requests "
                                   f"(it answered a request for part of the shard with all of it); serve "
                                   f"the shards from one that does, or read them through "
                                   f"data.shard_command")
        if not (100 <= status < 200 or 300 <= status < 400):  # informational, or a redirect curl follows
            raise OSError(f"HTTP status {status}")


