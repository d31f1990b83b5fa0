"""The sharder on a synthetic LibriSpeech layout: round trip, determinism, every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from w2v_dist.prep.shards import ShardOptions, shard_corpus
from w2v_dist.prep.sources import librispeech_sources


def read_back(out: Path) -> dict[str, tuple[dict, bytes]]:
    urls = [str(out / s["name"]) for s in json.loads((out / "index.json").read_text())["shards"]]
    return {s["__key__"]: (json.loads(s["json"]), s["flac"])
            for s in wds.WebDataset(urls, shardshuffle=False)}


def test_round_trip_every_key_text_and_sample(corpus: Path, tmp_path: Path) -> None:
    sources = librispeech_sources(corpus, ["train-clean-100"])
    index = shard_corpus(sources, tmp_path / "out", ShardOptions(shard_size_mb=0.2, workers=2),
                         {"subsets": ["x"]})
    samples = read_back(tmp_path / "out")
    assert index["totals"]["written"] == len(sources) == len(samples) and index["totals"]["shards"] > 1
    for src in sources:
        meta, flac = samples[src.key]
        assert flac == src.audio.read_bytes()  # 16 kHz mono FLAC is copied, not re-encoded
        assert meta["text"] == src.text and meta["source"] == src.source
        assert meta["speaker"] == src.key.split("-")[0] and meta["sample_rate"] == 16_000
    names = subprocess.run(["tar", "-tf", str(tmp_path / "out" / index["shards"][0]["name"])],
                           capture_output=True, text=True, check=True).stdout.split()
    assert names[0].endswith(".flac") and names[1].endswith(".json")
    for shard in index["shards"]:
        assert hashlib.sha256((tmp_path / "out" / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and vocab["|"] == 4
    assert sum(index["duration_histogram"]["counts"]) == len(sources)


def test_same_inputs_give_byte_identical_output(corpus: Path, tmp_path: Path) -> None:
    sources = librispeech_sources(corpus, ["dev-clean"])
    for run in ("a", "b"):
        shard_corpus(sources, tmp_path / run, ShardOptions(shard_size_mb=0.05, workers=2),
                     {"subsets": ["dev"]})
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    assert "index.json" in files and "index.columns/num_samples.npy" in files
    for name in files:
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        if name == "index.columns/meta.json":  # when index.json was written: the columns' staleness check
            a, b = (json.loads(meta) | {"index_mtime_ns": 0} for meta in (a, b))
        assert a == b, name


@pytest.fixture()
def bad_corpus(corpus: Path, tmp_path: Path) -> Path:
    """A copy of dev-clean with one of each kind of bad input added."""
    root = tmp_path / "LibriSpeech"
    shutil.copytree(corpus / "dev-clean", root / "dev-clean")
    chapter = root / "dev-clean" / "900" / "9000"
    chapter.mkdir(parents=True)
    good = sorted((root / "dev-clean").glob("*/*/*.flac"))[0].read_bytes()
    rng = np.random.default_rng(0)
    (chapter / "900-9000-0001.flac").write_bytes(good[: len(good) // 2])  # truncated
    (chapter / "900-9000-0002.flac").write_bytes(b"not a flac at all" * 10)  # corrupt
    (chapter / "900-9000-0004.flac").write_bytes(good)  # no transcript line
    sf.write(chapter / "900-9000-0005.flac", rng.normal(0, 0.1, 300).astype("float32"), 16_000)  # too short
    # CTC infeasible
    sf.write(chapter / "900-9000-0006.flac", rng.normal(0, 0.1, 4_000).astype("float32"), 16_000)
    # stereo
    sf.write(chapter / "900-9000-0007.flac", rng.normal(0, 0.1, (44_100, 2)).astype("float32"), 44_100)
    for key in ("0008", "0009"):
        (chapter / f"900-9000-{key}.flac").write_bytes(good)
    lines = ["900-9000-0001 TRUNCATED FILE", "900-9000-0002 CORRUPT FILE", "900-9000-0003 AUDIO IS MISSING",
             "900-9000-0005 TOO SHORT", "900-9000-0006 " + "A VERY LONG LABEL FOR A QUARTER SECOND",
             "900-9000-0007 STEREO AT FORTY FOUR", "900-9000-0008 ", "900-9000-0009 CHAPTER 12"]
    (chapter / "900-9000.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("check_audio", ["full", "tail"])
def test_bad_inputs_are_rejected_with_reasons_and_counted(bad_corpus: Path, tmp_path: Path,
                                                          check_audio: str) -> None:
    sources = librispeech_sources(bad_corpus, ["dev-clean"])
    index = shard_corpus(sources, tmp_path / "out", ShardOptions(workers=2, check_audio=check_audio),
                         {"subsets": ["dev-clean"]})
    rejects = {r["key"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").open())}
    expected = {"900-9000-0001": "unreadable audio", "900-9000-0002": "unreadable audio",
                "900-9000-0003": "audio file missing", "900-9000-0004": "no transcript line",
                "900-9000-0005": "receptive field", "900-9000-0006": "CTC infeasible",
                "900-9000-0008": "empty transcript", "900-9000-0009": "outside the vocabulary"}
    assert set(rejects) == set(expected)
    for key, reason in expected.items():
        assert reason in rejects[key], (key, rejects[key])
    totals = index["totals"]
    assert totals["inputs"] == totals["written"] + totals["rejected"] == len(sources)
    # The same corpus gives the same rejects.jsonl, in words a user can act on: no object reprs or addresses.
    assert "audio decoder error" in rejects["900-9000-0002"] and "0x" not in rejects["900-9000-0002"]
    shard_corpus(sources, tmp_path / "again", ShardOptions(workers=2, check_audio=check_audio),
                 {"subsets": ["dev-clean"]})
    first, second = ((tmp_path / d / "rejects.jsonl").read_text() for d in ("out", "again"))
    assert first == second and " at 0x" not in first and "object" not in first
    meta, flac = read_back(tmp_path / "out")["900-9000-0007"]
    audio, rate = sf.read(__import__("io").BytesIO(flac))
    assert rate == 16_000 and audio.ndim == 1 and meta["converted_from"] == "44100 Hz, 2 ch"
    assert meta["num_samples"] == len(audio) == 16_000


def test_existing_shards_are_refused_without_overwrite(corpus: Path, tmp_path: Path) -> None:
    sources = librispeech_sources(corpus, ["dev-clean"])
    shard_corpus(sources, tmp_path / "out", ShardOptions(workers=1), {})
    with pytest.raises(FileExistsError, match="--overwrite"):
        shard_corpus(sources, tmp_path / "out", ShardOptions(workers=1), {})
    shard_corpus(sources, tmp_path / "out", ShardOptions(workers=1, overwrite=True), {})


def test_cli_shard_dry_run_writes_nothing(corpus: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "shard", "--librispeech", str(corpus),
                           "--subset", "dev-clean", "--out", str(tmp_path / "out"), "--dry-run", "--workers",
                           "1"],
                          capture_output=True, text=True, check=True)
    assert "12 inputs = 12 written + 0 rejected; would write" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_cli_shard_fails_when_nothing_is_accepted_and_names_the_commonest_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from w2v_dist.cli import main

    tone = np.sin(np.arange(16_000) * 0.05).astype(np.float32)
    lines = []
    for key, text in (("a", "ROOM 101"), ("b", "FLOOR 2"), ("c", "ПРИВЕТ")):
        sf.write(tmp_path / f"{key}.flac", tone, 16_000)
        lines.append(f"{key}.flac\t{text}\n")
    (tmp_path / "m.tsv").write_text("".join(lines))
    args = ["shard", "--manifest", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("shard: nothing written: all 3 inputs were rejected; the commonest reason (3 of "
                            "3): characters outside the vocabulary: '01' (e.g. a); --digits keep accepts "
                            "digits"), error
    assert "--alphabet any accepts the letters of every script" in error
    assert not (tmp_path / "out" / "index.json").exists() and len(
        (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 3
    assert main([*args, "--digits", "keep", "--alphabet", "any"]) == 0  # the options named accept them all
    assert "3 inputs = 3 written + 0 rejected" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_manifest_route_shards_any_corpus(corpus: Path, tmp_path: Path, kind: str) -> None:
    from w2v_dist.prep.sources import manifest_sources

    sources = librispeech_sources(corpus, ["dev-clean"])
    manifest = tmp_path / f"corpus.{kind}"
    if kind == "tsv":
        manifest.write_text("path\ttranscript\tspeaker\n" + "".join(
            f"{s.audio}\t{s.text.lower()}\tspk{s.speaker}\n" for s in sources))
    else:
        manifest.write_text("".join(json.dumps({"path": str(s.audio), "text": s.text,
                                                "key": f"utt-{i:03d}"}) + "\n"
                                    for i, s in enumerate(sources)))
    index = shard_corpus(manifest_sources(manifest), tmp_path / "out", ShardOptions(workers=1),
                         {"manifest": "m"})
    samples = read_back(tmp_path / "out")
    assert index["totals"]["written"] == len(sources) == len(samples)
    expected_keys = {s.key for s in sources} if kind == "tsv" else {f"utt-{i:03d}"
                                                                    for i in range(len(sources))}
    assert set(samples) == expected_keys
    assert {m["text"] for m, _ in samples.values()} == {s.text for s in sources}  # normalised upper-case


def test_manifest_with_duplicate_keys_is_refused(tmp_path: Path) -> None:
    from w2v_dist.prep.sources import manifest_sources

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.flac", "text": "A", "key": "k"}\n{"path": "b.flac", "text": "B", '
                        '"key": "k"}\n')
    with pytest.raises(ValueError, match="duplicate keys"):
        manifest_sources(manifest)
