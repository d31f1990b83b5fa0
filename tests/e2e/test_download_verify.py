"""``w2v-dist download`` against a loopback HTTP server (with Range support) and ``w2v-dist verify`` on real
shards."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from w2v_dist.cli import main
from w2v_dist.prep.download import MARKER, download_subset, read_checksums
from w2v_dist.prep.shards import ShardOptions, shard_corpus
from w2v_dist.prep.sources import librispeech_sources


@dataclass
class ServerState:
    directory: Path
    honour_range: bool = True
    drop_after: int | None = None
    """Send only this many body bytes of the next response, then close (once)."""
    requests: list[tuple[str | None, int, int]] = field(default_factory=list)
    """Per request: its Range header, the status sent and the body bytes sent."""


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with ``Range: bytes=N-[M]`` support, which ``SimpleHTTPRequestHandler`` lacks."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        path = state.directory / self.path.lstrip("/")
        if "/" in self.path.lstrip("/") or not path.is_file():
            self.send_error(404)
            state.requests.append((self.headers.get("Range"), 404, 0))
            return
        data = path.read_bytes()
        wanted = self.headers.get("Range") if state.honour_range else None
        start, end, status = 0, len(data) - 1, 200
        if wanted:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start, end, status = int(first), int(last) if last else len(data) - 1, 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                state.requests.append((wanted, 416, 0))
                return
        body = data[start:end + 1]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.drop_after is not None:
            body, state.drop_after = body[:state.drop_after], None
            self.close_connection = True
        self.wfile.write(body)
        state.requests.append((self.headers.get("Range"), status, len(body)))


@contextmanager
def range_server(directory: Path) -> Iterator[tuple[str, ServerState]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.state = ServerState(directory)  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def write_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.fixture(scope="module")
def mirror_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dev-clean.tar.gz`` laid out like LibriSpeech's, and its ``md5sum.txt``."""
    served = tmp_path_factory.mktemp("mirror")
    members = [file_member("LibriSpeech/README.TXT", b"synthetic LibriSpeech layout\n")]
    members += [file_member(f"LibriSpeech/dev-clean/{p.relative_to(corpus / 'dev-clean').as_posix()}",
                            p.read_bytes())
                for p in sorted((corpus / "dev-clean").rglob("*")) if p.is_file()]
    md5 = write_archive(served / "dev-clean.tar.gz", members)
    (served / "md5sum.txt").write_text(f"{md5}  dev-clean.tar.gz\n")
    return served


@pytest.fixture()
def served(mirror_dir: Path) -> Iterator[tuple[str, ServerState]]:
    with range_server(mirror_dir) as (url, state):
        yield url, state


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != MARKER)
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()
                           and p.name != MARKER) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_download_checks_extracts_and_shards(served: tuple[str, ServerState], mirror_dir: Path, corpus: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, state = served
    root = tmp_path / "data"
    args = ["download", "--subset", "dev-clean", "--root", str(root), "--mirror", url,
            "--checksums", str(mirror_dir / "md5sum.txt")]
    assert main(args) == 0
    subset = root / "LibriSpeech" / "dev-clean"
    assert same_tree(subset, corpus / "dev-clean") and (root / "LibriSpeech" / "README.TXT").is_file()
    md5 = read_checksums(mirror_dir / "md5sum.txt")["dev-clean.tar.gz"]
    assert json.loads((subset / MARKER).read_text())["md5"] == md5
    # archive deleted, no staging, no partial
    assert sorted(p.name for p in root.iterdir()) == ["LibriSpeech"]
    assert [status for _, status, _ in state.requests] == [200]
    # The round trip: what was downloaded shards like the original corpus, and the shards verify.
    sources = librispeech_sources(root, ["dev-clean"])
    index = shard_corpus(sources, tmp_path / "shards", ShardOptions(shard_size_mb=0.1, workers=1),
                         {"subsets": ["d"]})
    assert index["totals"]["written"] == len(sources) == len(librispeech_sources(corpus, ["dev-clean"]))
    assert main(["verify", str(tmp_path / "shards")]) == 0
    # A rerun is a no-op: it does not even need the server.
    capsys.readouterr()
    assert main([*args[:-4], "--mirror", "http://127.0.0.1:9", "--checksums", args[-1]]) == 0
    assert "already complete" in capsys.readouterr().out and len(state.requests) == 1


def test_checksum_mismatch_is_refused_and_nothing_extracted(served: tuple[str, ServerState], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    sums = tmp_path / "md5sum.txt"
    sums.write_text("0123456789abcdef0123456789abcdef  dev-clean.tar.gz\n")
    root = tmp_path / "data"
    assert main(["download", "--subset", "dev-clean", "--root", str(root), "--mirror", served[0],
                 "--checksums", str(sums)]) == 1
    err = capsys.readouterr().err
    assert "does not match the expected 0123456789abcdef" in err and "deleted the download" in err
    assert list(root.iterdir()) == []


def test_unknown_subset_needs_checksums(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "--subset", "train-clean-5", "--root", str(tmp_path)]) == 1
    assert "--checksums" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["resume", "server-ignores-range", "connection-dropped", "already-whole"])
def test_partial_downloads_resume(case: str, served: tuple[str, ServerState], mirror_dir: Path, corpus: Path,
                                  tmp_path: Path) -> None:
    url, state = served
    data = (mirror_dir / "dev-clean.tar.gz").read_bytes()
    half = len(data) // 2
    partial = tmp_path / "dev-clean.tar.gz.partial"
    partial.write_bytes(data if case == "already-whole" else b"" if case == "connection-dropped"
                        else data[:half])
    state.honour_range = case != "server-ignores-range"
    state.drop_after = half if case == "connection-dropped" else None
    sums = read_checksums(mirror_dir / "md5sum.txt")
    download_subset("dev-clean", tmp_path, url, sums, backoff=0, log=lambda _: None)
    assert same_tree(tmp_path / "LibriSpeech" / "dev-clean", corpus / "dev-clean") and not partial.exists()
    expected = {"resume": [(f"bytes={half}-", 206, len(data) - half)],
                "server-ignores-range": [(f"bytes={half}-", 200, len(data))],
                "connection-dropped": [(None, 200, half), (f"bytes={half}-", 206, len(data) - half)],
                "already-whole": [(f"bytes={len(data)}-", 416, 0)]}[case]
    assert state.requests == expected


EVIL = {"dotdot": [file_member("../evil.txt", b"x"), file_member("../../evil.txt", b"x")],
        "absolute": [file_member("{outside}/evil.txt", b"x")],
        "symlink-out": [link_member("LibriSpeech/dev-clean/out", "{outside}"),
                        file_member("LibriSpeech/dev-clean/out/evil.txt", b"x")],
        "symlink-up": [link_member("LibriSpeech/dev-clean/up", "../../../../outside")],
        "hardlink": [link_member("LibriSpeech/dev-clean/hard", "{outside}/secret", tarfile.LNKTYPE)],
        "device": [(tarfile.TarInfo("LibriSpeech/dev-clean/null"), None)],
        "other-subset": [file_member("LibriSpeech/train-clean-100/x.txt", b"x")]}
EVIL["device"][0][0].type = tarfile.CHRTYPE


@pytest.mark.parametrize("case", sorted(EVIL))
def test_hostile_archive_is_refused_and_writes_nothing(case: str, corpus: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    outside, served_dir, root = tmp_path / "outside", tmp_path / "served", tmp_path / "a" / "b" / "root"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    served_dir.mkdir()
    good = sorted((corpus / "dev-clean").rglob("*.flac"))[0]
    # lands in staging first
    members = [file_member(f"LibriSpeech/dev-clean/1/2/{good.name}", good.read_bytes())]
    for info, data in EVIL[case]:
        info.name, info.linkname = info.name.format(outside=outside), info.linkname.format(outside=outside)
        members.append((info, data))
    md5 = write_archive(served_dir / "dev-clean.tar.gz", members)
    (tmp_path / "sums.txt").write_text(f"{md5}  dev-clean.tar.gz\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    with range_server(served_dir) as (url, _):
        assert main(["download", "--subset", "dev-clean", "--root", str(root), "--mirror", url,
                     "--checksums", str(tmp_path / "sums.txt")]) == 1
    assert "refusing member" in capsys.readouterr().err
    # Only the verified archive is new (kept for inspection); nothing extracted anywhere, the staging dir is
    # gone.
    assert sorted(p for p in tmp_path.rglob("*")) == sorted([*before, tmp_path / "a", root.parent, root,
                                                             root / "dev-clean.tar.gz"])
    assert (outside / "secret").read_text() == "secret"


@pytest.fixture()
def shard_copy(shard_dirs: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shard_dirs["train-clean-100"], out)
    return out


def test_clean_shards_verify(shard_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(shard_copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [s["name"] for s in json.loads((shard_copy / "index.json").read_text())["shards"]]
    assert len(names) > 1 and [line.split()[:2] for line in lines[:-1]] == [[n, "ok"] for n in names]
    assert lines[-1].startswith(f"OK: {len(names)} shards, {len(names)} ok, 0 with problems")


def corrupt_flac(shard: Path, index_file: Path) -> None:
    """Damage the body of the first FLAC in place, then re-record the sha256 so only decoding can tell."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".flac"))
    data = bytearray(shard.read_bytes())
    start, end = member.offset_data + member.size // 4, member.offset_data + member.size
    data[start:end] = bytes((i * 37) & 0xFF for i in range(end - start))  # same length: the tar stays intact
    shard.write_bytes(bytes(data))
    index = json.loads(index_file.read_text())
    index["shards"][1]["sha256"] = hashlib.sha256(data).hexdigest()
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "flac", "extra", "order"])
def test_damaged_shards_fail_and_are_named(damage: str, shard_copy: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    index_file = shard_copy / "index.json"
    index = json.loads(index_file.read_text())
    shard = shard_copy / index["shards"][1]["name"]
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "missing":
        shard.unlink()
    elif damage == "flac":
        corrupt_flac(shard, index_file)
    elif damage == "extra":
        shard = shard_copy / "shard-000099.tar"
        shutil.copy(shard_copy / index["shards"][0]["name"], shard)
    else:
        rows = index["shards"][1]["utterances"]
        rows[0], rows[1] = rows[1], rows[0]
        index_file.write_text(json.dumps(index))
    assert main(["verify", str(shard_copy), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAILED" in line and not line.startswith("FAILED")]
    assert [line.split()[0] for line in failed] == [shard.name], out
    assert out.splitlines()[-1].startswith("FAILED:")
    if damage == "flac":
        assert "FLAC" in failed[0] or "samples decoded" in failed[0], failed[0]
