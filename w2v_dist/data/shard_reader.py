"""Reading the samples of one tar shard, local or remote (``http(s)://`` through curl, ``pipe:`` commands),
whole, as webdataset streams them (:func:`read_members`; byte ranges are :mod:`w2v_dist.data.ranges`). A
transfer that fails mid-shard is re-opened with backoff (:func:`retrying`), a stall never hangs, a local tar
that ends early ends its shard with a warning."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from webdataset.gopen import Pipe

from w2v_dist.data.index import is_remote
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
    return retrying(url, lambda delivered: _read_once(url, wanted - delivered, retry), skips, retry)


def retrying(url: str, read_once: Callable[[set[str]], Iterator[Sample]], skips: Counter[str],
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
