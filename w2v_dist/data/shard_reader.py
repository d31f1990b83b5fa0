"""Reading the samples of one tar shard, local or remote (``http(s)://`` through curl, ``pipe:`` commands):
whole shards as webdataset streams them (:func:`read_members`), or only the byte ranges of the samples wanted
(:func:`read_ranges`: a seek, an HTTP Range request). A transfer that fails mid-shard is re-opened with
backoff, a stall never hangs, a local tar that ends early ends its shard with a warning."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import webdataset as wds
from webdataset.gopen import Pipe

from w2v_dist.data.index import is_remote
from w2v_dist.data.offsets import parse_sample
from w2v_dist.redact import redact

log = logging.getLogger("w2v_dist.data")
Sample = tuple[str, dict[str, bytes]]
"""A sample's key and its members' bytes by extension (``{"flac": ..., "json": ...}``)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a remote shard (``http(s)://``, ``pipe:``) that fails mid-read is re-opened."""

    attempts: int = 5
    """Opens of one shard, the first included, before the run fails naming it."""
    backoff_seconds: float = 1.0
    """Wait before the first retry; doubled for each further one."""
    max_backoff_seconds: float = 30.0
    stall_seconds: int = 60
    """An HTTP transfer slower than 1 byte/s for this long is cut (and retried): a stalled server never
    hangs."""


class RemoteShardError(RuntimeError):
    """A remote shard kept failing after every retry, or its server cannot serve byte ranges."""


class RangesUnsupported(RemoteShardError):
    """A server that answers a request for part of a shard with all of it (or more than asked)."""


class CurlPipe(Pipe):
    """webdataset's ``Pipe`` whose close never waits long: a stream closed before its end (the reader has
    what it wanted, or is being torn down) stops curl instead of waiting up to webdataset's two hours for it
    to exit."""

    CLOSE_GRACE_SECONDS = 5.0

    def close(self) -> None:
        if self.stream.closed:
            return
        self.stream.close()  # curl, if still writing, gets EPIPE and exits 23
        try:
            self.proc.wait(self.CLOSE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:  # still reading the network: nobody wants its bytes any more
            self.proc.kill()
            self.proc.wait()
            self.ignore_status.append(-signal.SIGKILL)
        self.wait_for_child()


def curl_command(url: str, retry: RetryPolicy, *options: str) -> list[str]:
    """curl told to fail on HTTP errors and on stalls (its own retries off: ours re-open mid-shard, which
    curl cannot do on a pipe)."""
    return ["curl", "-f", "-sS", "-L", "--connect-timeout", "30", "--speed-limit", "1",
            "--speed-time", str(retry.stall_seconds), *options, url]


def open_shard(url: str, retry: RetryPolicy) -> Any:
    """webdataset's opener, with curl as :func:`curl_command` runs it."""
    if url.startswith(("http://", "https://")):
        command = curl_command(url, retry)
        # Closed early: curl exits 23 on EPIPE, or dies of SIGPIPE (-13; 141 through a shell).
        return CurlPipe(command, mode="rb", bufsize=8192, ignore_status=[141, 23, -signal.SIGPIPE])
    return wds.gopen(url, "rb")


def read_members(url: str, wanted: set[str], skips: Counter[str], retry: RetryPolicy = RetryPolicy()
                 ) -> Iterator[Sample]:
    """Samples of one shard whose key is wanted, in tar order, streaming the whole shard.

    A local tar that ends early ends the shard with a warning (the samples it did not deliver are counted by
    the caller as ``missing_member``). A remote shard whose transfer fails (a dropped connection, an HTTP
    error, a ``pipe:`` command exiting non-zero) is re-opened with backoff, skipping the samples already
    delivered; each retry is counted as ``shard_retries``; after ``retry.attempts`` opens the run fails
    naming the shard.
    """
    return _retrying(url, lambda delivered: _read_once(url, wanted - delivered, retry), skips, retry)


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
    return _in_order(keys, _retrying(
        url, lambda delivered: read(url, [[s for s in run if s[0] not in delivered] for run in runs], retry),
        skips, retry))


def _retrying(url: str, read_once: Callable[[set[str]], Iterator[Sample]], skips: Counter[str],
              retry: RetryPolicy) -> Iterator[Sample]:
    """The samples ``read_once(delivered)`` yields, opening the shard again after a failed transfer
    (``read_once`` skips the keys already ``delivered``): the retry policy of :func:`read_members`."""
    delivered: set[str] = set()
    for attempt in range(1, retry.attempts + 1):
        try:
            for key, members in read_once(delivered):
                delivered.add(key)
                yield key, members
            return
        except (tarfile.TarError, OSError, EOFError) as err:
            # A transfer that failed shows as an OSError (the pipe's exit status); a remote tar that is
            # itself truncated reads cleanly to a short end (a TarError or EOFError with a clean exit),
            # like a local one.
            if not is_remote(url) or not isinstance(err, OSError):
                log.warning("shard %s is truncated or corrupt (%s); its remaining samples are skipped",
                            redact(url), err)
                skips["truncated_shard"] += 1
                return
            if attempt == retry.attempts:
                raise RemoteShardError(f"shard {redact(url)} failed {attempt} times, last: "
                                       f"{transfer_error(err)}; check the server or the shard "
                                       f"command") from None
            delay = min(retry.max_backoff_seconds, retry.backoff_seconds * 2 ** (attempt - 1))
            log.warning("shard %s failed after %d of its samples (%s); retry %d of %d in %.1f s",
                        redact(url), len(delivered), transfer_error(err), attempt, retry.attempts - 1, delay)
            skips["shard_retries"] += 1
            time.sleep(delay)


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


def transfer_error(err: OSError) -> str:
    """webdataset reports a failed pipe as its whole argument tuple; the exit status is what matters (curl's
    own message is on stderr)."""
    status = re.search(r"exit (-?\d+)", str(err))
    return (f"{'curl' if 'curl' in str(err) else 'the command'} exited with status {status.group(1)}"
            if status else redact(str(err)))


def _read_once(url: str, wanted: set[str], retry: RetryPolicy) -> Iterator[Sample]:
    try:
        stream = open_shard(url, retry)
    except Exception as err:
        raise RuntimeError(f"cannot open shard {redact(url)}: {err}") from err
    current: dict[str, bytes] = {}
    key = ""
    with stream:
        try:
            for member in wds.tariterators.tar_file_iterator(
                    stream, select_files=lambda f: f.split(".")[0] in wanted):
                prefix, _, ext = member["fname"].partition(".")
                if prefix != key:
                    if key in wanted:
                        yield key, current
                    key, current = prefix, {}
                if prefix in wanted:
                    current[ext] = member["data"]
        except GeneratorExit:  # the reader left early: how the abandoned transfer ends does not matter
            if isinstance(stream, Pipe):
                stream.ignore_errors = True
            raise
    if key in wanted:  # only once the stream closed cleanly: a cut transfer may have cut this sample short
        yield key, current
