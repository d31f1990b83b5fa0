"""Test helpers: building streams over real shards, a loopback HTTP server, running 2-rank DeepSpeed."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformers import Wav2Vec2Processor

from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import load_shard_set
from w2v_dist.data.loader import EvalStream, Preprocess, TrainStream, make_loader, make_preprocess
from w2v_dist.data.plan import BatchPolicy, StreamLayout

REPO = Path(__file__).resolve().parent.parent
POLICY = BatchPolicy(max_batch_samples=8 * 16_000, max_batch_size=4, bucket_window=8, shuffle_buffer=6)


def preprocess(model_dir: Path) -> Preprocess:
    return make_preprocess(Wav2Vec2Processor.from_pretrained(model_dir), EncoderGeometry(), 16_000, 0.2, 35.0)


def train_stream(location: str, model_dir: Path, rank: int = 0, world: int = 1, workers: int = 0,
                 seed: int = 1) -> TrainStream:
    return TrainStream(load_shard_set(location), POLICY, preprocess(model_dir), rank=rank, world_size=world,
                       layout=StreamLayout(world, max(1, workers), seed))


def eval_stream(location: str, model_dir: Path, rank: int, world: int) -> EvalStream:
    return EvalStream(load_shard_set(location), POLICY, preprocess(model_dir), rank=rank, world_size=world)


def take_batches(stream: TrainStream, workers: int, count: int) -> list[dict]:
    return list(itertools.islice(iter(make_loader(stream, workers, 2)), count))


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, but cuts the first ``drops`` transfers of every ``.tar`` mid-file: the full Content-Length is
    promised, half the bytes are sent, the connection is closed (what a dropped connection looks like)."""

    drops: int = 0
    served: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        count = self.served[self.path] = self.served.get(self.path, 0) + 1
        if not self.path.endswith(".tar") or count > self.drops:
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def http_server(directory: Path, drops: int = 0) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (an ephemeral port) for the duration of the block; with ``drops``, the
    first ``drops`` requests for each shard are cut mid-transfer (:class:`FlakyHandler`)."""
    flaky = type("Flaky", (FlakyHandler,), {"drops": drops, "served": {}})
    handler = functools.partial(flaky, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_deepspeed(args: list[str], ranks: int = 2, timeout: float = 600, cwd: Path = REPO
                  ) -> subprocess.CompletedProcess[str]:
    """``deepspeed --num_gpus N train.py ARGS`` on DeepSpeed's CPU accelerator (gloo)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(REPO / "train.py"), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = python_stacks(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n--- stacks ---\n{stacks}\n--- stdout ---\n"
                             f"{stdout[-4000:]}\n--- stderr ---\n{stderr[-8000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def python_stacks(pid: int) -> str:
    """Every Python thread's stack in ``pid`` and its descendants (py-spy): what a hung job was waiting on."""
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return "(the job had already exited)"
    dumps = []
    for process in processes:
        try:
            command = " ".join(process.cmdline())[:160]
        except psutil.Error:
            continue
        spy = str(Path(sys.executable).with_name("py-spy"))
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(process.pid)], capture_output=True, text=True,
                                  timeout=30)
            dumps.append(f"## {process.pid} {command}\n{dump.stdout}{dump.stderr}")
        except (OSError, subprocess.TimeoutExpired) as err:
            dumps.append(f"## {process.pid} {command}\n(py-spy failed: {err})")
    return "\n".join(dumps)


def run_single(args: list[str], timeout: float = 600, env: dict[str, str] | None = None,
               base_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python train.py ARGS``: one process, no launcher."""
    full_env = dict(base_env if base_env is not None else os.environ, OMP_NUM_THREADS="2", WANDB_MODE="disabled",
                    **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


RECIPE = {"model.mask_time_prob": 0.3, "model.mask_time_length": 2, "model.layerdrop": 0.1,
          "schedule.name": "tri_stage",
          "deepspeed.extra": "{zero_optimization: {stage3_param_persistence_threshold: 0}}"}
"""What the base recipe does that a toy setting would hide: SpecAugment masks (length 2: the test clips are
short), LayerDrop (with the default seed, update 4 skips a layer of the 2-layer tiny model), the tri-stage lr,
and, under ZeRO-3, every parameter partitioned (DeepSpeed keeps those under 100k elements whole by default: all
of the tiny model's, so no layer would be gathered or released)."""


def overrides(shard_dirs: dict, model: Path, out: Path, **extra: object) -> list[str]:
    """``key=value`` arguments for ``configs/debug.yaml`` on the test corpus: small sizes, the :data:`RECIPE`'s
    randomness and schedule; a test that turns one off says why."""
    values = {"output_dir": out, "data.train_shards": shard_dirs["train-clean-100"],
              "data.dev_shards": f"{{dev-clean: {shard_dirs['dev-clean']}}}", "model.name_or_path": model,
              "data.max_batch_seconds": 8.0, "data.bucket_window": 16, "data.shuffle_buffer": 8,
              "data.min_seconds": 0.2, "data.num_workers": 1, **RECIPE, "optim.lr": 1e-3, "trainer.max_steps": 6,
              "trainer.eval_every": 3, "trainer.save_every": 3, "trainer.log_every": 1, "logging.progress_bar": False,
              **extra}
    return [f"{k}={v}" for k, v in values.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wandb_artifacts(out: Path) -> list[dict]:
    """The artifacts logged by the offline wandb runs under ``out``: reads the runs' record logs (LevelDB's log
    format, 32 KiB blocks of 7-byte-headed fragments, after wandb's 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    found = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, record = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if (left := 32768 - pos % 32768) < 7 or data[pos:pos + 7] == bytes(7):  # a block's zero padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            record, pos = record + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last fragment of one
                parsed = wandb_internal_pb2.Record.FromString(record)
                if parsed.WhichOneof("record_type") == "artifact":
                    art = parsed.artifact
                    found.append({"name": art.name, "type": art.type, "aliases": list(art.aliases),
                                  "metadata": json.loads(art.metadata or "{}"),
                                  "refs": [entry.ref for entry in art.manifest.contents]})
                record = b""
    return found


def check(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@contextmanager
def small_filesystem(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``24m``) mounted at ``mount`` for the block: a disk that can be filled. Needs root
    (or CAP_SYS_ADMIN); the test is skipped without it, which fails under CI (``tests/conftest.py``)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
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
