"""Data for tests: streams over real shards, a loopback HTTP server (that can cut transfers), a small disk, a
hub cache laid out as ``huggingface_hub`` writes it."""

from __future__ import annotations

import functools
import http.server
import itertools
import random
import re
import shutil
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import Wav2Vec2Processor

from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import ShardSet, Utterance, columns_of, load_shard_set
from w2v_dist.data.loader import EvalStream, TrainStream, make_loader
from w2v_dist.data.plan import BatchPolicy, StreamLayout
from w2v_dist.data.preprocess import Preprocess, make_preprocess

POLICY = BatchPolicy(max_batch_samples=8 * 16_000, max_batch_size=4, bucket_window=8, shuffle_buffer=6)
SR = 16_000


def make_shards(sizes: list[int], seed: int = 0) -> list[list[Utterance]]:
    """Shards of made-up utterances (no audio): ``sizes[s]`` in shard ``s``, 1 to 20 s long, 5 to 50
    tokens."""
    rng = random.Random(seed)
    return [[Utterance(s, p, f"s{s}-{p}", int(rng.uniform(1, 20) * SR), rng.randint(5, 50))
             for p in range(n)] for s, n in enumerate(sizes)]


def shard_set(shards: list[list[Utterance]], name: str = "mem") -> ShardSet:
    """A shard set in memory (no tars) of :func:`make_shards`' utterances: for plans at metadata speed."""
    return ShardSet(name, tuple(f"{name}/s{i}.tar" for i in range(len(shards))),
                    tuple(sum(u.num_samples for u in s) / SR for s in shards),
                    columns_of(tuple(map(tuple, shards))), SR)


def preprocess(model_dir: Path) -> Preprocess:
    processor = Wav2Vec2Processor.from_pretrained(model_dir)
    return make_preprocess(processor, EncoderGeometry(), 16_000, 0.2, 35.0)


def train_stream(location: str, model_dir: Path, rank: int = 0, world: int = 1, workers: int = 0,
                 seed: int = 1) -> TrainStream:
    return TrainStream(load_shard_set(location), POLICY, preprocess(model_dir), rank=rank, world_size=world,
                       layout=StreamLayout(world, max(1, workers), seed))


def eval_stream(location: str, model_dir: Path, rank: int, world: int) -> EvalStream:
    return EvalStream(load_shard_set(location), POLICY, preprocess(model_dir), rank=rank, world_size=world)


def take_batches(stream: TrainStream, workers: int, count: int) -> list[dict]:
    return list(itertools.islice(iter(make_loader(stream, workers, 2)), count))


@dataclass
class Traffic:
    """What a test server (:func:`http_server`) was asked for and sent, per path."""

    requests: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    """Body bytes."""
    ranges: dict[str, list[str]] = field(default_factory=dict)
    """The ``Range`` header of each request that had one."""


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, ``.tar`` files with single-range ``Range: bytes=a-b`` requests (206 + Content-Range),
    but cuts the first ``drops`` transfers of every ``.tar``, whole or a range, midway: the full
    Content-Length is promised, half the bytes are sent, the connection is closed (what a dropped connection
    looks like). Without ``ranges`` a Range header is ignored (200 with the whole file, as some servers
    do)."""

    drops: int = 0
    ranges: bool = True
    traffic: Traffic = Traffic()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.traffic.requests[self.path] += 1
        if not self.path.endswith(".tar"):
            return super().do_GET()
        try:
            data = Path(self.translate_path(self.path)).read_bytes()
        except OSError:
            return self.send_error(404)
        if (wanted := self.headers.get("Range")) is not None:
            self.traffic.ranges.setdefault(self.path, []).append(wanted)
        body, wanted = data, wanted if self.ranges else None
        if wanted is not None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if not match or int(match[1]) >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            first, last = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
            body = data[first:last + 1]
        self.send_response(200 if wanted is None else 206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(body)))
        if wanted is not None:
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.end_headers()
        if self.traffic.requests[self.path] <= self.drops:
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)
        self.traffic.sent[self.path] += len(body)
        if self.close_connection:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def http_server(directory: Path, drops: int = 0, ranges: bool = True, traffic: Traffic | None = None
                ) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (an ephemeral port) for the duration of the block; with ``drops``,
    the first ``drops`` requests for each shard are cut mid-transfer (:class:`FlakyHandler`); without
    ``ranges``, Range requests get the whole file. ``traffic`` is filled in with what was asked and sent."""
    flaky = type("Flaky", (FlakyHandler,),
                 {"drops": drops, "ranges": ranges, "traffic": traffic or Traffic()})
    handler = functools.partial(flaky, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def small_filesystem(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``24m``) mounted at ``mount`` for the block: a disk that can be filled.
    Needs root (or CAP_SYS_ADMIN); the test is skipped without it, which fails under CI
    (``tests/conftest.py``)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory: Path, leave: int) -> Path:
    """Fill the file system holding ``directory`` up to ``leave`` free bytes; the filler file, to delete."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, shutil.disk_usage(directory).free - leave))
    return filler


def hub_cache(home: Path, repo_id: str, files: Path) -> Path:
    """``home`` (an ``HF_HOME``) holding hub model ``repo_id`` with the files of ``files``, laid out as
    ``huggingface_hub`` writes its cache (``hub/models--org--name/refs/main`` naming a snapshot): what
    ``w2v-dist fetch-model`` leaves, made without a network. Returns the snapshot directory."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
